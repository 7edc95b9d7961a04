import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reaction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REACTION_UNSPECIFIED: _ClassVar[Reaction]
    REACTION_DONE: _ClassVar[Reaction]
    REACTION_SNOOZE: _ClassVar[Reaction]
    REACTION_DISMISS: _ClassVar[Reaction]
REACTION_UNSPECIFIED: Reaction
REACTION_DONE: Reaction
REACTION_SNOOZE: Reaction
REACTION_DISMISS: Reaction

class ReactionEvent(_message.Message):
    __slots__ = ("event_id", "reaction", "value", "reacted_at")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    REACTION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    REACTED_AT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    reaction: Reaction
    value: float
    reacted_at: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., reaction: _Optional[_Union[Reaction, str]] = ..., value: _Optional[float] = ..., reacted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DecisionEvent(_message.Message):
    __slots__ = ("event_id", "policy_name", "policy_version", "prompt_version", "candidate_id", "probability", "decided_at")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    policy_name: str
    policy_version: str
    prompt_version: str
    candidate_id: str
    probability: float
    decided_at: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., policy_name: _Optional[str] = ..., policy_version: _Optional[str] = ..., prompt_version: _Optional[str] = ..., candidate_id: _Optional[str] = ..., probability: _Optional[float] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
