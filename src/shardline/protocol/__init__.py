"""Everything two parties must agree on, with no I/O (DESIGN §2).

Range planning and the ownership rule, the boundary-marker item schema, the
exchange frame codec and session state machine, and job/shard state names.
Imports nothing outside the standard library and `shardline.errors`.
"""

from ._frames import (
    CLOSED,
    DEFAULT_MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Ack,
    Done,
    Error,
    ExchangeSession,
    Failed,
    Fragment,
    Frame,
    FrameType,
    Head,
    Hello,
    Pending,
    Progress,
    Role,
    SessionState,
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
from ._task import TASK_VERSION, ShardTask
from ._states import (
    JobEvent,
    JobState,
    ShardEvent,
    ShardState,
    next_job_state,
    next_shard_state,
)

__all__ = [
    "CLOSED", "DEFAULT_MAX_FRAME_BYTES", "PROTOCOL_VERSION", "Ack", "Done", "Error",
    "ExchangeSession", "Failed", "Fragment", "Frame", "FrameType", "Head", "Hello",
    "Pending", "Progress", "Role", "SessionState", "Want", "Welcome", "new_job_secret",
    "DEFAULT_MARKER_TABLE", "MARKER_ATTRIBUTE_DEFINITIONS", "MARKER_KEY_SCHEMA",
    "MARKER_TTL_ATTRIBUTE", "PUT_CONDITION", "Marker", "marker_key",
    "NEED_DATA", "Boundary", "HeadScanner", "LineLengthGuard", "ShardRange",
    "check_delimiter", "nominal_starts", "plan_shards",
    "TASK_VERSION", "ShardTask",
    "JobEvent", "JobState", "ShardEvent", "ShardState", "next_job_state", "next_shard_state",
]
