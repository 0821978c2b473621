"""Operations: the processes that run the service (the native stack, its supervisor, nginx and gunicorn settings)."""
