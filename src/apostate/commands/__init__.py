"""The commands: `apostate MODEL` (run), report, reproduce, inspect. Nothing imports them but the CLI."""
