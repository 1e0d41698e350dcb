"""dermkit.synth"""
