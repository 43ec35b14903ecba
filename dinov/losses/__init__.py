"""dinov.losses"""
