"""Launches the Gradio UI (``hf_paged.ui``) against a running TGI-compatible server.

    python demos/gradio_app.py --endpoint http://127.0.0.1:8080 [--api-key KEY] [--port 7860]

``hf-paged serve`` mounts the same UI at ``/ui`` without this script.
"""
from hf_paged.ui import main

if __name__ == "__main__":
    main()
