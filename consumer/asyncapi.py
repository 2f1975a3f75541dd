"""An AsyncAPI 3.0.0 document of an app: what ``consumer asyncapi MODULE:APP`` writes.

Channels are the topics ``consumer topics`` lists (:func:`consumer.topics.needed`: sources,
``<topic>.dlq``, ``<topic>.conflicts``, ``<topic>.retry`` for ``retry="topics"``, declared
publish targets), plus one reply channel per source, whose address is the request's
``reply-to`` header (AsyncAPI 3's request/reply: an Operation Reply with a runtime address,
https://www.asyncapi.com/docs/reference/specification/v3.0.0#operationReplyObject).
Operations: ``receive`` on sources and retry topics, ``send`` on dead letters, conflicts,
retry topics and publish targets. Payloads are the pydantic models' JSON schemas
(``pydantic.json_schema.models_json_schema``, the many-models form of ``model_json_schema``),
their ``$defs`` hoisted into ``components/schemas`` and every ``$ref`` pointing there; the
headers are :mod:`consumer.asyncapi_headers`'. Kafka bindings are version 0.5.0
(https://github.com/asyncapi/bindings/tree/master/kafka).

A plain function returning a JSON-able dict; the command (consumer/cli/asyncapi.py) prints it.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from consumer import asyncapi_headers as hdr
from consumer.app import App
from consumer.constants import HEADER_CORRELATION_ID, HEADER_REPLY_TO
from consumer.handler import Handler
from consumer.settings import Settings
from consumer.topics import Need, needed

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING = "0.5.0"
REJECTION = "consumer.Rejection"  # a reply's body when the record was rejected
Doc = dict[str, Any]
_REF = "#/components/schemas/{model}"
_KEY_FROM = {
    "header": "a header",
    "record": "the record key",
    "payload": "derived from the payload",
}
# CONSUMER_KAFKA_SASL_MECHANISM -> AsyncAPI 3.0 security scheme type.
_SASL = {"PLAIN": "plain", "SCRAM-SHA-256": "scramSha256", "SCRAM-SHA-512": "scramSha512"}


def document(
    app: App[Any], s: Settings, *, title: str | None = None, version: str = "1.0.0"
) -> Doc:
    """The AsyncAPI document of ``app`` with the servers of ``s`` (its Kafka bootstrap)."""
    needs = needed(app)
    b = _Builder(app, s, {n.topic for n in needs})
    for need in needs:
        b.add(need)
    b.publishing_sources()
    doc: Doc = {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title or app.group,
            "version": version,
            "description": f"Consumer group {app.group}: handlers "
            + ", ".join(h.name for h in app.handlers)
            + ". Written by `consumer asyncapi` (dedup-consumer).",
        },
        "defaultContentType": s.default_content_type,
        "servers": servers(s),
        "channels": b.channels,
        "operations": b.operations,
        "components": {"messages": b.messages, "schemas": b.schemas},
    }
    schemes = security_schemes(s)
    if schemes:
        doc["components"]["securitySchemes"] = schemes
    return doc


def servers(s: Settings) -> Doc:
    """One server per bootstrap address; ``kafka-secure`` over TLS, SASL as a security scheme."""
    hosts = [h.strip() for h in s.kafka_bootstrap.split(",") if h.strip()]
    tls = s.kafka_security_protocol in ("SSL", "SASL_SSL")
    refs = [{"$ref": f"#/components/securitySchemes/{n}"} for n in security_schemes(s)]
    out: Doc = {}
    for i, host in enumerate(hosts):
        server: Doc = {
            "host": host,
            "protocol": "kafka-secure" if tls else "kafka",
            "description": f"Kafka broker, security protocol {s.kafka_security_protocol} "
            "(CONSUMER_KAFKA_SECURITY_PROTOCOL).",
        }
        if refs:
            server["security"] = refs
        out["kafka" if len(hosts) == 1 else f"kafka-{i}"] = server
    return out


def security_schemes(s: Settings) -> Doc:
    """The SASL mechanism and a TLS client certificate, as AsyncAPI security schemes."""
    out: Doc = {}
    if s.kafka_security_protocol.startswith("SASL_"):
        mech = s.kafka_sasl_mechanism
        if mech in _SASL:
            out["sasl"] = {"type": _SASL[mech], "description": f"SASL {mech}"}
        else:  # OAUTHBEARER: the token comes from the configured provider
            out["sasl"] = {"type": "oauth2", "description": f"SASL {mech}", "flows": {}}
    if s.kafka_security_protocol in ("SSL", "SASL_SSL") and s.kafka_ssl_cert_file:
        out["tls-client-certificate"] = {"type": "X509", "description": "mutual TLS"}
    return out


class _Builder:
    """Channels, operations, messages and schemas, filled one needed topic at a time."""

    def __init__(self, app: App[Any], s: Settings, topics: set[str]) -> None:
        self.app, self.s = app, s
        self.topics = topics  # channel and message ids of their own: never given to another
        self.by_name = {h.name: h for h in app.handlers}
        self.types = list(app.codecs.content_types)
        self.channels: Doc = {}
        self.operations: Doc = {}
        self.messages: Doc = {}
        self.refs, self.schemas = _payloads(app)

    def add(self, need: Need) -> None:
        h = self.by_name[need.handler]
        topic, src = need.topic, need.source
        payload = self.refs[(h.schema, "validation")]
        if need.role == "source":
            headers = hdr.schema(*hdr.source(h, self.s, self.types))
            self._message(
                topic,
                h.schema.__name__,
                f"What {h.name} consumes; its idempotency key is {_KEY_FROM[h.key_from]}.",
                payload,
                headers,
                correlated=True,
                key=h.key_from == "record",
            )
            self._channel(topic, f"Source topic of {h.name}.")
            self._operation(
                "receive",
                topic,
                f"{h.name} handles each message once per key.",
                reply=self._reply(h, topic),
            )
        elif need.role == "retry":
            self._message(
                topic,
                h.schema.__name__,
                f"A message of {src} {h.name} retries.",
                payload,
                hdr.retry(h, self.s, self.types),
            )
            self._channel(topic, f"Retries of {src} that do not block its partition.")
            self._operation("send", topic, "A transient failure is retried here, when due.")
            self._operation("receive", topic, f"{h.name} runs it again once due.")
        elif need.role in ("dlq", "conflicts"):
            dlq = need.role == "dlq"
            what = "Dead letters" if dlq else "Conflicts (a key reused with another payload)"
            self._message(
                topic,
                h.schema.__name__,
                f"{what} of {src}: the original value and record key, untouched.",
                payload,
                hdr.dead_letter() if dlq else hdr.conflict(),
            )
            self._channel(topic, f"{what} of {src}, written through the outbox.")
            self._operation("send", topic, f"{what} of {src}.")
        else:
            self._publish_target(topic)

    def publishing_sources(self) -> None:
        """A declared publish target that is also a source of the app (needed() lists it
        once, as a source) gets its send operation too."""
        for h in self.app.handlers:
            for topic in h.publishes:
                if f"send-{topic}" not in self.operations:
                    self._operation("send", topic, f"{h.name} publishes here (publishes=).")

    def _publish_target(self, topic: str) -> None:
        models = list(
            dict.fromkeys(
                m for h in self.app.handlers if (m := h.publish_schemas.get(topic)) is not None
            )
        )
        names = ", ".join(h.name for h in self.app.handlers if topic in h.publishes)
        headers = hdr.published(self.s.default_content_type)
        if not models:
            self._message(
                topic, "message", f"Published by {names} (no model declared).", {}, headers
            )
        for m in models:
            mid = topic if len(models) == 1 else self._unused(f"{topic}.{m.__name__}")
            self._message(
                mid,
                m.__name__,
                f"Published by {names} through the outbox.",
                self.refs[(m, "serialization")],
                headers,
                channel=topic,
            )
        self._channel(topic, f"Declared by {names} (publishes=).")
        self._operation("send", topic, f"{names} publish here, exactly once per consumed key.")

    def _reply(self, h: Handler[Any, Any], topic: str) -> Doc:
        cid = self._unused(f"{topic}.reply")
        result = _returns(h)
        body = (
            self.refs[(result, "serialization")]
            if result is not None
            else {"description": "The handler's result in its stored (JSON) form."}
        )
        payload = {"anyOf": [body, {"$ref": _REF.format(model=REJECTION)}]}
        self._message(
            cid,
            f"{result.__name__ if result else 'result'}",
            f"Replies of {h.name}: "
            "its result, or the rejection; a duplicate gets the first reply again.",
            payload,
            hdr.reply(self.s),
            correlated=True,
        )
        self.channels[cid] = {
            "address": None,
            "title": f"replies of {topic}",
            "description": f"The topic a request to {topic} names in its {HEADER_REPLY_TO} header.",
            "messages": {cid: {"$ref": f"#/components/messages/{_pointer(cid)}"}},
        }
        return {
            "address": {"location": f"$message.header#/{HEADER_REPLY_TO}"},
            "channel": {"$ref": f"#/channels/{_pointer(cid)}"},
            "messages": [{"$ref": f"#/channels/{_pointer(cid)}/messages/{_pointer(cid)}"}],
        }

    def _unused(self, name: str) -> str:
        """``name``, or ``name-2`` ..., an id no topic, channel or message has."""
        taken = self.topics | set(self.channels) | set(self.messages)
        out, n = name, 1
        while out in taken:
            n += 1
            out = f"{name}-{n}"
        return out

    def _message(
        self,
        mid: str,
        name: str,
        summary: str,
        payload: Doc,
        headers: Doc,
        *,
        channel: str | None = None,
        correlated: bool = False,
        key: bool = False,
    ) -> None:
        msg: Doc = {
            "name": name,
            "title": name,
            "summary": summary,
            "headers": headers,
            "payload": payload,
        }
        if correlated:
            msg["correlationId"] = {"location": f"$message.header#/{HEADER_CORRELATION_ID}"}
        if key:
            key_schema = {"type": "string", "description": "The idempotency key (key='record')."}
            msg["bindings"] = {"kafka": {"key": key_schema, "bindingVersion": KAFKA_BINDING}}
        self.messages[mid] = msg
        ch = self.channels.setdefault(channel or mid, {"messages": {}})
        ch["messages"][mid] = {"$ref": f"#/components/messages/{_pointer(mid)}"}

    def _channel(self, topic: str, description: str) -> None:
        ch = self.channels[topic]
        ch.update(
            {
                "address": topic,
                "description": description,
                "bindings": {"kafka": {"topic": topic, "bindingVersion": KAFKA_BINDING}},
            }
        )
        # address first, messages last: the order a reader expects
        self.channels[topic] = {
            k: ch[k] for k in ("address", "description", "bindings", "messages")
        }

    def _operation(self, action: str, topic: str, summary: str, reply: Doc | None = None) -> None:
        ch = _pointer(topic)
        op: Doc = {
            "action": action,
            "channel": {"$ref": f"#/channels/{ch}"},
            "summary": summary,
            "messages": [
                {"$ref": f"#/channels/{ch}/messages/{_pointer(m)}"}
                for m in self.channels[topic]["messages"]
            ],
        }
        if action == "receive":
            group = {"type": "string", "enum": [self.app.group]}
            op["bindings"] = {"kafka": {"groupId": group, "bindingVersion": KAFKA_BINDING}}
        if reply is not None:
            op["reply"] = reply
        self.operations[f"{action}-{topic}"] = op


def _payloads(app: App[Any]) -> tuple[dict[tuple[type[BaseModel], JsonSchemaMode], Doc], Doc]:
    """Every model's schema: a ``$ref`` per (model, mode), and the schemas they point to."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = []
    for h in app.handlers:
        wanted.append((h.schema, "validation"))  # what a message must be to be handled
        result = _returns(h)
        if result is not None:
            wanted.append((result, "serialization"))  # what a reply holds
        wanted.extend((m, "serialization") for m in h.publish_schemas.values())
    refs, top = models_json_schema(list(dict.fromkeys(wanted)), ref_template=_REF)
    schemas = {name: _asyncapi_schema(s) for name, s in top.get("$defs", {}).items()}
    schemas[REJECTION] = {
        "type": "object",
        "description": "A reply to a rejected request (consumer.Reject): the reason.",
        "properties": {"rejected": {"type": "string"}},
        "required": ["rejected"],
    }
    return {
        (m, mode): dict(v) for (m, mode), v in refs.items() if issubclass(m, BaseModel)
    }, schemas


def _returns(h: Handler[Any, Any]) -> type[BaseModel] | None:
    """The pydantic model the handler's function is annotated to return, if it is one."""
    try:
        result = typing.get_type_hints(h.fn).get("return")
    except Exception:  # an annotation that does not resolve: no model, nothing to describe
        return None
    return result if isinstance(result, type) and issubclass(result, BaseModel) else None


# Where a JSON Schema holds subschemas: maps of them, lists of them, or one (or, for
# ``items``, either). Everything else (default, examples, enum, const) is data, left alone.
_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_ONE = frozenset(
    {
        "items",
        "additionalItems",
        "additionalProperties",
        "not",
        "if",
        "then",
        "else",
        "contains",
        "propertyNames",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)


def _asyncapi_schema(node: Any) -> Any:
    """A JSON Schema 2020-12 node (pydantic's) as an AsyncAPI Schema Object (a JSON Schema
    draft-07 superset): ``prefixItems`` becomes ``items`` as a list (extra items in
    ``additionalItems``), and an OpenAPI-style ``discriminator`` object its property name,
    the form AsyncAPI's ``discriminator`` takes."""
    if not isinstance(node, dict):
        return node  # true / false schemas
    out: Doc = {}
    for k, v in node.items():
        if k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: _asyncapi_schema(sub) for name, sub in v.items()}
        elif k in _SCHEMA_LISTS and isinstance(v, list):
            out[k] = [_asyncapi_schema(sub) for sub in v]
        elif k in _SCHEMA_ONE:
            out[k] = (
                [_asyncapi_schema(x) for x in v] if isinstance(v, list) else _asyncapi_schema(v)
            )
        else:
            out[k] = v
    if "prefixItems" in out:
        rest = out.pop("items", None)
        out["items"] = out.pop("prefixItems")
        if rest is not None:
            out["additionalItems"] = rest
    if isinstance(out.get("discriminator"), dict):
        out["discriminator"] = out["discriminator"].get("propertyName", "")
    return out


def _pointer(name: str) -> str:
    """``name`` as a JSON Pointer token (RFC 6901): ``~`` and ``/`` escaped."""
    return name.replace("~", "~0").replace("/", "~1")
