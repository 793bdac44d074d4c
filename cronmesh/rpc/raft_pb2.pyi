from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RaftMessage(_message.Message):
    __slots__ = ("payload", "cluster_id", "wire")
    FROM_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    WIRE_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    cluster_id: str
    wire: int
    def __init__(self, payload: _Optional[bytes] = ..., cluster_id: _Optional[str] = ..., wire: _Optional[int] = ..., **kwargs) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RaftBatch(_message.Message):
    __slots__ = ("payloads", "cluster_id", "wire")
    FROM_FIELD_NUMBER: _ClassVar[int]
    PAYLOADS_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    WIRE_FIELD_NUMBER: _ClassVar[int]
    payloads: _containers.RepeatedScalarFieldContainer[bytes]
    cluster_id: str
    wire: int
    def __init__(self, payloads: _Optional[_Iterable[bytes]] = ..., cluster_id: _Optional[str] = ..., wire: _Optional[int] = ..., **kwargs) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("command", "cluster_id")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    command: bytes
    cluster_id: str
    def __init__(self, command: _Optional[bytes] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class ProposeReply(_message.Message):
    __slots__ = ("code", "error", "value", "leader")
    CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    code: int
    error: str
    value: bytes
    leader: str
    def __init__(self, code: _Optional[int] = ..., error: _Optional[str] = ..., value: _Optional[bytes] = ..., leader: _Optional[str] = ...) -> None: ...
