"""Worker service: runs one model replica behind the mesh."""
