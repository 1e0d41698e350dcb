"""dermkit.eval"""
