"""Message models shared by producers and handlers. Each model names its schema version."""
