"""A per-user task list: the data behind the task toolset."""
