"""Names shared across the package: Redis key prefixes, header names, SQL schema.

Every Redis key the framework writes is built here, so a reader can see the whole key space
in one place. Keys carry the namespace inside a hash tag (``{ns}``) so that all keys of one
namespace land in the same Redis Cluster slot.
"""

from __future__ import annotations

from consumer.keys import MAX_KEY_BYTES as MAX_KEY_BYTES  # derived keys are held to it too
from consumer.keys import escape

LEASE_PREFIX = "lease"
DONE_PREFIX = "done"

HEADER_IDEMPOTENCY_KEY = "idempotency-key"
HEADER_CONTENT_TYPE = "content-type"
HEADER_TENANT = "tenant"
HEADER_REPLY_TO = "reply-to"
# FastStream's names on Kafka, plain UTF-8 values (faststream/kafka/response.py,
# KafkaPublishCommand.headers_to_publish; faststream/kafka/parser.py reads them back).
HEADER_REPLY_TO_FASTSTREAM = "reply_to"
HEADER_CORRELATION_ID = "correlation-id"
HEADER_CORRELATION_ID_FASTSTREAM = "correlation_id"
HEADER_REASON = "x-reason"
HEADER_DETAIL = "x-detail"
HEADER_NAMESPACE = "x-namespace"
HEADER_KEY = "x-idempotency-key"
HEADER_HASH = "x-payload-hash"
HEADER_STORED_HASH = "x-stored-hash"
HEADER_SOURCE = "x-source"
HEADER_OUTCOME = "x-outcome"
# consumer/outbox/envelopes.py: a dead letter's original headers, exactly (replay restores them)
HEADER_ORIGINAL_HEADERS = "x-original-headers"
HEADER_REPLAYED_FROM = "x-replayed-from"
# consumer/outbox/sending.py: a dead letter sent without its value (too large for the producer)
HEADER_TRUNCATED = "x-truncated"  # consumer/replay.py: the dead letter a copy came from
TRACEPARENT = "traceparent"
# consumer/runtime/retry_topics.py: a record on <topic>.retry, the run it is for, when it is
# due (epoch ms), where the original was (topic/partition/offset), and why it is retried
HEADER_RETRY_ATTEMPT = "x-retry-attempt"
HEADER_RETRY_DUE_MS = "x-retry-due-ms"
HEADER_RETRY_ORIGIN = "x-retry-origin"
HEADER_RETRY_REASON = "x-retry-reason"
# Headers a reply sets itself (consumer/outbox/envelopes.py::reply): never copied from the
# request (settings.reply_copy_headers refuses them).
REPLY_OWN_HEADERS = frozenset(
    {
        HEADER_CONTENT_TYPE,
        HEADER_IDEMPOTENCY_KEY,
        HEADER_OUTCOME,
        HEADER_NAMESPACE,
        HEADER_KEY,
        HEADER_SOURCE,
        TRACEPARENT,
        "tracestate",
    }
)

CONTENT_MSGPACK = "application/msgpack"
CONTENT_JSON = "application/json"

DLQ_SUFFIX = ".dlq"
CONFLICT_SUFFIX = ".conflicts"
RETRY_SUFFIX = ".retry"  # consumer/runtime/retry_topics.py: retries that do not block
# The topics only the framework writes: no reply goes there (consumer/runtime/replies.py).
FRAMEWORK_SUFFIXES = (DLQ_SUFFIX, CONFLICT_SUFFIX, RETRY_SUFFIX)
# Kafka's own topics (__consumer_offsets, __transaction_state): the broker refuses appends
# (InvalidTopicError), so a reply there could never be sent.
KAFKA_INTERNAL_PREFIX = "__"
# The topics the broker itself refuses appends to (Kafka's ``Topic.INTERNAL_TOPICS`` plus the
# KRaft metadata log and share-group state): a row published there is resent forever.
KAFKA_INTERNAL_TOPICS = frozenset(
    {"__consumer_offsets", "__transaction_state", "__share_group_state", "__cluster_metadata"}
)

# The largest n of a back-off's 2**n (or multiplier**n): past it every delay is at its cap
# anyway, and an exact 2**n of a huge n (an attempt number read from a record) never ends.
MAX_BACKOFF_EXPONENT = 64

HASH_ALG = "blake2b-128"
OUTBOX_SHARDS = 64
NOTIFY_CHANNEL = "dedup_outbox"


def lease_key(namespace: str, key: str) -> str:
    """The namespace contains no brace (consumer/keys.py), so the hash tag, hence the Redis
    Cluster slot, is the namespace's whatever the key holds, and the key is all after it."""
    return f"{LEASE_PREFIX}:{{{namespace}}}:{key}"


def done_key(namespace: str, key: str, epoch: str = "") -> str:
    """``epoch`` is the database's (dedup.meta): markers of another database never match.

    The epoch is escaped (consumer/keys.py) so that its end is the first ``:`` after the tag
    whatever an epoch looks like: (epoch ``a``, key ``b:c``) and (epoch ``a:b``, key ``c``)
    of two databases sharing a Redis must not share a marker.
    """
    return f"{DONE_PREFIX}:{{{namespace}}}:{escape(epoch)}:{key}"
