"""
The foundations every layer stands on: the settings declared once, the samplers'
registry, seeds from strings, atomic writes and the rules for listing image files.
"""
