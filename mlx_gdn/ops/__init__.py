"""The recurrence and its chunked form in plain MLX ops: the exact paths every kernel must equal."""
