"""dermkit.explain"""
