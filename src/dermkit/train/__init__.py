"""dermkit.train"""
