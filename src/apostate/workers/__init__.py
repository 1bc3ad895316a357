"""Worker coordination: many processes running one study in a shared database."""
