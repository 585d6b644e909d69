"""Everything two parties must agree on, with no I/O (DESIGN §2).

Range planning and the ownership rule, the boundary-marker item schema, the
exchange frame codec and session state machine, and job/shard state names.
Imports nothing outside the standard library and `shardline.errors`.
"""

from ._frames import (
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Done,
    Error,
    Failed,
    Fragment,
    Frame,
    FrameType,
    Head,
    Hello,
    Pending,
    Progress,
    Want,
    Welcome,
    new_job_secret,
)
from ._markers import (
    DEFAULT_MARKER_TABLE,
    MARKER_ATTRIBUTE_DEFINITIONS,
    MARKER_KEY_SCHEMA,
    MARKER_TTL_ATTRIBUTE,
    PUT_CONDITION,
    Marker,
    marker_key,
)
from ._ranges import (
    NEED_DATA,
    Boundary,
    HeadScanner,
    LineLengthGuard,
    ShardRange,
    check_delimiter,
    nominal_starts,
    plan_shards,
)
from ._session import CLOSED, ExchangeSession, Role, SessionState
from ._states import (
    JobEvent,
    JobState,
    ShardEvent,
    ShardState,
    next_job_state,
    next_shard_state,
)
from ._task import TASK_VERSION, ShardTask

__all__ = [
    "CLOSED",
    "DEFAULT_MARKER_TABLE",
    "DEFAULT_MAX_FRAME_BYTES",
    "MARKER_ATTRIBUTE_DEFINITIONS",
    "MARKER_KEY_SCHEMA",
    "MARKER_TTL_ATTRIBUTE",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "PUT_CONDITION",
    "TASK_VERSION",
    "Ack",
    "Boundary",
    "Done",
    "Error",
    "ExchangeSession",
    "Failed",
    "Fragment",
    "Frame",
    "FrameType",
    "Head",
    "HeadScanner",
    "Hello",
    "JobEvent",
    "JobState",
    "LineLengthGuard",
    "Marker",
    "Pending",
    "Progress",
    "Role",
    "SessionState",
    "ShardEvent",
    "ShardRange",
    "ShardState",
    "ShardTask",
    "Want",
    "Welcome",
    "check_delimiter",
    "marker_key",
    "new_job_secret",
    "next_job_state",
    "next_shard_state",
    "nominal_starts",
    "plan_shards",
]
