"""dinov.train"""
