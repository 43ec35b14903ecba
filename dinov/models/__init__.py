"""dinov.models"""
