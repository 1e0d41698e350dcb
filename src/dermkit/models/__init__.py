"""dermkit.models"""
