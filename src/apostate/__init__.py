"""apostate: fully automatic removal of refusal behaviour from open-weight chat models."""

__version__ = "0.1.0"
