"""dinov.data"""
