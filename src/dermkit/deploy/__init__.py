"""dermkit.deploy"""
