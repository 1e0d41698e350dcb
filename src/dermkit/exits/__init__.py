"""dermkit.exits"""
