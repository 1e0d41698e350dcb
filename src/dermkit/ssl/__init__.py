"""dermkit.ssl"""
