"""
The web page (Gradio) that runs the translation jobs for uploads.
"""
