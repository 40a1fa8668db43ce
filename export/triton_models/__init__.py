"""`model.py` files of the Triton Python-backend models that `mmfast.export.triton_server` writes.

Each file is copied as is into `<repo>/<model>/1/model.py`; it runs inside Triton's Python backend
(which provides `triton_python_backend_utils`) with mmfast installed, and reads its settings
from the JSON file written beside it.
"""
