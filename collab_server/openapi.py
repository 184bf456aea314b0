"""The OpenAPI 3 description of the HTTP API (collab_server.http_api), served at /api/openapi.json."""

from __future__ import annotations

from typing import Any

from collab_server.names import MAX_NAME

NAME = {
    "name": "name", "in": "path", "required": True,
    "description": "Document name: UTF-8 text without the control characters U+0000-U+001F; may contain '/' "
                   "(percent-encode '?', '#' and '%').",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_NAME, "pattern": "^[^\\x00-\\x1f]+$"},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _json(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


MAX_LABEL = 200
FORMAT = {"name": "format", "in": "query", "required": False,
          "schema": {"type": "string", "enum": ["json", "update"], "default": "json"}}
VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}}
STRING = {"type": "string"}
ID = {"type": "string", "minLength": 1}
STATUS = {"type": "string", "enum": ["notStarted", "processing", "done", "error"]}
RESERVED = ("index_name", "status", "timestamp", "statusWrites")


def _op(name: str, description: str, fields: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "description": description, "additionalProperties": False,
            "required": ["op", "id", *required],
            "properties": {"op": {"const": name}, "id": ID, **fields}}


BASE64URL = "^([A-Za-z0-9_-]{4})*([A-Za-z0-9_-]{2}(==)?|[A-Za-z0-9_-]{3}=?)?$"  # padding optional
BINARY_UPDATE = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
AUTH_ERRORS = {
    "401": _error("Auth is on and no token was given"),
    "403": _error("Invalid, expired or non-covering token (or read-only token on a write)"),
}
READ_ERRORS = {
    "400": _error("Invalid document name or parameter"),
    **AUTH_ERRORS,
    "404": _error("The document was never written"),
    "503": _error("Storage unavailable"),
}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "DocInfo": {
        "type": "object", "required": ["name", "updated", "log_entries"],
        "properties": {
            "name": {"type": "string"},
            "updated": {"type": "number", "description": "Unix seconds of the last write"},
            "log_entries": {"type": "integer", "description": "Updates not yet folded into the checkpoint"},
        },
    },
    "DocList": {"type": "object", "required": ["docs", "next"],
                "properties": {"docs": {"type": "array", "items": _ref("DocInfo")},
                               "next": {"type": ["string", "null"],
                                        "description": "Pass as `after` for the next page; null on the last"}}},
    "IndexEntry": {
        "type": "object", "required": ["index_name", "status"],
        "properties": {"index_name": {"type": "string"}, "status": {"type": ["string", "null"]},
                       "timestamp": {"type": ["number", "null"]}},
        "additionalProperties": True,
    },
    "Block": {
        "type": "object",
        "properties": {"id": {"type": ["string", "null"]}, "type": {"type": ["string", "null"]},
                       "content": {"type": "string"},
                       "indexingList": {"type": "array", "items": _ref("IndexEntry")}},
    },
    "DocJson": {
        "type": "object", "required": ["name", "blocks"],
        "properties": {"name": {"type": "string"},
                       "blocks": {"type": "object", "additionalProperties": _ref("Block")}},
    },
    "DocAtJson": {
        "type": "object", "required": ["name", "seq", "blocks"],
        "properties": {"name": {"type": "string"}, "seq": {"type": "integer"},
                       "blocks": {"type": "object", "additionalProperties": _ref("Block")}},
    },
    "JsonValue": {
        "description": "Any JSON value Yjs clients can hold: integers within ±(2^53-1), nesting up to 32 deep",
        "oneOf": [{"type": "string"}, {"type": "boolean"}, {"type": "null"},
                  {"type": "integer", "minimum": -(2**53 - 1), "maximum": 2**53 - 1},
                  {"type": "number", "not": {"type": "integer"}},
                  {"type": "array", "items": _ref("JsonValue")},
                  {"type": "object", "additionalProperties": _ref("JsonValue")}],
    },
    "EditOp": {"oneOf": [
        _op("create_block", "Create the block unless one with this id exists (then nothing changes)",
            {"type": STRING, "content": STRING}, ["type"]),
        _op("delete_block", "Delete the block, if there is one", {}, []),
        _op("set_content", "Make the block's text this, replacing only the span that differs; with `expect`, "
            "only if the block's text is that (else 409, nothing changed)",
            {"content": STRING, "expect": STRING}, ["content"]),
        _op("add_index", "Add an index entry unless one with this name exists",
            {"index_name": ID, "status": STATUS,
             "metadata": {"type": "object", "additionalProperties": _ref("JsonValue"),
                          "not": {"anyOf": [{"required": [key]} for key in RESERVED]}}}, ["index_name"]),
        _op("remove_index", "Remove the first index entry with this name, if there is one",
            {"index_name": ID}, ["index_name"]),
        _op("set_status", "Write a status that supersedes every status write the server holds for the entry; "
            "with `expect`, only if the entry's status is that (else 409, nothing changed)",
            {"index_name": ID, "status": STATUS, "expect": {"type": ["string", "null"]}}, ["index_name", "status"]),
        _op("set_metadata", "Set metadata keys of the entry; null removes a key",
            {"index_name": ID,
             "metadata": {"type": "object", "additionalProperties": _ref("JsonValue"),
                          "not": {"anyOf": [{"required": [key]} for key in RESERVED]}}},
            ["index_name", "metadata"]),
    ]},
    "Edits": {"type": "object", "required": ["ops"], "additionalProperties": False,
              "properties": {"ops": {"type": "array", "minItems": 1, "maxItems": 1000, "items": _ref("EditOp")}}},
    "EditedBlocks": {
        "type": "object", "required": ["name", "blocks"],
        "properties": {"name": {"type": "string"},
                       "blocks": {"type": "object", "description": "Each block the ops named, after them; "
                                  "null if it does not exist", "additionalProperties": {
                                      "oneOf": [_ref("Block"), {"type": "null"}]}}},
    },
    "Version": {
        "type": "object", "required": ["id", "time", "label", "size", "auto"],
        "properties": {"id": {"type": "integer"}, "time": {"type": "number", "description": "Unix seconds"},
                       "label": {"type": "string"}, "size": {"type": "integer", "description": "Bytes saved"},
                       "auto": {"type": "boolean", "description": "Saved on the --version-interval schedule; "
                                "only the newest --versions-keep of these are kept"}},
    },
    "VersionList": {"type": "object", "required": ["name", "versions"],
                    "properties": {"name": {"type": "string"},
                                   "versions": {"type": "array", "items": _ref("Version")}}},
    "VersionJson": {
        "type": "object", "required": ["name", "version", "blocks"],
        "properties": {"name": {"type": "string"}, "version": {"type": "integer"},
                       "blocks": {"type": "object", "additionalProperties": _ref("Block")}},
    },
    "Restored": {
        "type": "object", "required": ["name", "saved_before", "blocks"],
        "properties": {"name": {"type": "string"}, "saved_before": _ref("Version"),
                       "blocks": {"type": "object", "additionalProperties": _ref("Block")}},
    },
    "LogEntry": {
        "type": "object", "required": ["seq", "time", "size"],
        "properties": {"seq": {"type": "integer"}, "time": {"type": "number"}, "size": {"type": "integer"}},
    },
    "History": {"type": "object", "required": ["name", "entries"],
                "properties": {"name": {"type": "string"}, "entries": {"type": "array", "items": _ref("LogEntry")}}},
}

PATHS: dict[str, Any] = {
    "/api/openapi.json": {"get": {
        "summary": "This OpenAPI document", "security": [{}],
        "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
    }},
    "/api/docs": {"get": {
        "summary": "List stored documents, a page at a time, in name order",
        "description": "With auth on, needs a prefix token whose prefix begins `prefix` "
                       '(issued with prefix "" for every document).',
        "parameters": [
            {"name": "prefix", "in": "query", "required": False,
             "schema": {"type": "string", "default": "", "pattern": "^[^\\x00-\\x1f]*$"},
             "description": "Only documents whose name starts with this"},
            {"name": "after", "in": "query", "required": False,
             "schema": {"type": "string", "default": "", "pattern": "^[^\\x00-\\x1f]*$"},
             "description": "Only documents whose name sorts after this (the previous page's `next`)"},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}},
        ],
        "responses": {"200": _json("A page of stored documents", "DocList"),
                      "400": _error("Invalid limit"), **AUTH_ERRORS, "503": _error("Storage unavailable")},
    }},
    "/api/docs/{name}": {"delete": {
        "summary": "Delete the document: its connections are closed (code 4410), its log and checkpoint erased",
        "description": "The whole rest of the path is the name. Connected clients hold replicas: one that "
                       "reconnected would send its copy back. 4410 is a permanent close code for y-websocket "
                       "providers (4400-4499): they stop reconnecting. Revoke the tokens of clients that "
                       "reconnect regardless.",
        "parameters": [NAME],
        "responses": {
            "204": {"description": "Deleted"},
            "400": _error("Invalid document name"),
            **AUTH_ERRORS,
            "404": _error("No such document: nothing stored and nobody connected"),
            "503": _error("Storage unavailable: nothing was deleted (connections were closed with 1011)"),
        },
    }},
    "/api/docs/{name}/json": {"get": {
        "summary": "The document as JSON: blocks with resolved statuses (committed changes only)",
        "parameters": [NAME],
        "responses": {"200": _json("The document", "DocJson"), **READ_ERRORS,
                      "422": _error("The document does not follow the block model")},
    }},
    "/api/docs/{name}/update": {
        "get": {
            "summary": "The committed state as a binary Yjs v1 update",
            "parameters": [NAME, {
                "name": "sv", "in": "query", "required": False,
                "description": "base64url state vector: return only what a peer with this state lacks",
                "schema": {"type": "string", "pattern": BASE64URL},
            }],
            "responses": {"200": {"description": "A Yjs v1 update", "content": BINARY_UPDATE}, **READ_ERRORS},
        },
        "post": {
            "summary": "Apply a binary Yjs v1 update; committed and broadcast before the response",
            "parameters": [NAME],
            "requestBody": {"required": True, "content": BINARY_UPDATE},
            "responses": {
                "204": {"description": "Applied, committed and broadcast"},
                "400": _error("Invalid document name, empty body or invalid update"),
                **AUTH_ERRORS,
                "409": _error("The update waits for changes never sent, and the document holds as many such "
                              "changes as it takes"),
                "413": _error("Update larger than max_message_size"),
                "503": _error("Storage failure: the update was not saved"),
            },
        },
    },
    "/api/docs/{name}/blocks": {"post": {
        "summary": "Edit the document's blocks with JSON ops: all of them, in order, in one change, or none",
        "description": "All ops are checked before any applies: when one cannot apply, nothing "
                       "changes. The change is committed and broadcast before the response, like any other. "
                       "Creates the document if it does not exist.",
        "parameters": [NAME],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Edits")}}},
        "responses": {
            "200": _json("Applied, committed and broadcast: the blocks the ops named", "EditedBlocks"),
            "400": _error("Invalid document name, body or op"),
            **AUTH_ERRORS,
            "404": _error("An op needs a block or index entry that does not exist: nothing changed"),
            "409": _error("A set_content's `expect` is not the block's text, or a set_status's not the entry's "
                          "status: nothing changed"),
            "413": _error("Body larger than max_message_size"),
            "503": _error("Storage failure: the edits were not saved"),
        },
    }},
    "/api/docs/{name}/copy": {"post": {
        "summary": "Copy the document (or one of its saved versions) to a new document",
        "description": "Needs read access to the document and write access to the new one. The copy is "
                       "committed before the response and is a document of its own from then on.",
        "parameters": [NAME],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["to"], "additionalProperties": False,
            "properties": {"to": {**NAME["schema"], "description": "The new document's name"},
                           "version": {"type": "integer", "description": "Copy this saved version instead"}}}}}},
        "responses": {
            "201": {"description": "Copied", "content": {"application/json": {"schema": {
                "type": "object", "required": ["name", "from"],
                "properties": {"name": {"type": "string"}, "from": {"type": "string"}}}}}},
            **READ_ERRORS,
            "404": _error("No such document, or no such version"),
            "409": _error("The target document exists"),
            "413": _error("Body too large"),
        },
    }},
    "/api/docs/{name}/presence": {"get": {
        "summary": "Who is in the document now: connections to this node and everyone's awareness states",
        "description": "Awareness states come from the clients of every node; connections counts this "
                       "node's. A document nobody has open answers with none of either.",
        "parameters": [NAME],
        "responses": {
            "200": {"description": "Presence", "content": {"application/json": {"schema": {
                "type": "object", "required": ["name", "connections", "presence"],
                "properties": {
                    "name": {"type": "string"}, "connections": {"type": "integer"},
                    "presence": {"type": "array", "items": {
                        "type": "object", "required": ["client_id", "state"],
                        "properties": {"client_id": {"type": "integer"},
                                       "state": {"description": "The client's awareness state (JSON)"}}}}}}}}},
            "400": _error("Invalid document name"),
            **AUTH_ERRORS,
        },
    }},
    "/api/docs/{name}/versions": {
        "get": {
            "summary": "The versions saved of the document, oldest first",
            "parameters": [NAME],
            "responses": {"200": _json("Saved versions", "VersionList"), **READ_ERRORS},
        },
        "post": {
            "summary": "Save the document's committed state as a version; compaction never removes it",
            "parameters": [NAME],
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "additionalProperties": False,
                "properties": {"label": {"type": "string", "maxLength": MAX_LABEL,
                                         "pattern": "^[^\\x00-\\x1f]*$"}}}}}},
            "responses": {"201": _json("Saved", "Version"), **READ_ERRORS, "413": _error("Body too large")},
        },
    },
    "/api/docs/{name}/versions/{version}": {"get": {
        "summary": "A saved version, as JSON or as a Yjs v1 update",
        "parameters": [NAME, VERSION, FORMAT],
        "responses": {
            "200": {"description": "The saved version as JSON or as a Yjs v1 update",
                    "content": {"application/json": {"schema": _ref("VersionJson")}, **BINARY_UPDATE}},
            **READ_ERRORS,
            "422": _error("The saved version does not follow the block model"),
        },
    }},
    "/api/docs/{name}/versions/{version}/restore": {"post": {
        "summary": "Make the document's blocks those of a saved version, as one change that is committed and "
                   "broadcast before the response",
        "description": "Blocks are created, deleted or edited, index entries added, removed or given the saved "
                       "status and metadata; entries are matched by name. The state before is saved as a "
                       "version first (`saved_before`), so restoring that one undoes the restore.",
        "parameters": [NAME, VERSION],
        "responses": {"200": _json("Restored: the version saved just before, and the document's blocks now",
                                   "Restored"), **READ_ERRORS,
                      "422": _error("The saved version does not follow the block model")},
    }},
    "/api/docs/{name}/history": {"get": {
        "summary": "The update log entries not yet compacted into the checkpoint",
        "parameters": [NAME],
        "responses": {"200": _json("Log entries, oldest first", "History"), **READ_ERRORS},
    }},
    "/api/docs/{name}/at/{seq}": {"get": {
        "summary": "The document as it was after log entry seq",
        "parameters": [NAME,
                       {"name": "seq", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}},
                       FORMAT],
        "responses": {
            "200": {"description": "The past version as JSON or as a Yjs v1 update",
                    "content": {"application/json": {"schema": _ref("DocAtJson")}, **BINARY_UPDATE}},
            **READ_ERRORS,
            "410": _error("That part of the history was compacted away"),
            "422": _error("The document does not follow the block model"),
        },
    }},
}


def openapi_spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document for the /api/ routes."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "collab-server HTTP API", "version": "1.0.0",
                 "description": "Documents of a Yjs-compatible collaboration server. Document names may "
                                "contain '/': the name is the middle of each path, the operation its end."},
        "servers": [{"url": "/"}],
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "queryToken": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
        "security": [{"bearer": []}, {"queryToken": []}, {}],
    }
