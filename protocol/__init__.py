"""The gifting wire protocol: messages, codec and an asyncio client.

Importable on its own: nothing here imports the server package.
"""

from protocol.errors import GiftingError
from protocol.messages import ErrorCode

__all__ = ["ErrorCode", "GiftingError"]
