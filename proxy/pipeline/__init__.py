"""The request pipeline: ``Pipeline.handle(request, session, snapshot) -> Reply``."""

from proxy.pipeline.handle import Pipeline
from proxy.pipeline.reply import Reply
from proxy.pipeline.session import Session

__all__ = ["Pipeline", "Reply", "Session"]
