"""Channel workers: deliver ``push`` messages by email, app push and ads, exactly once, under consent.

See :mod:`infogap.stream.channels.app` for the worker and docs/channels.md for how it is run and proved.
"""
from infogap.stream.channels import outcomes, unsubscribe
from infogap.stream.channels.config import ChannelConfig
from infogap.stream.channels.messages import address_for, check_message, email_for, feedback_events

__all__ = ["ChannelConfig", "outcomes", "unsubscribe", "address_for", "check_message", "email_for", "feedback_events"]
