"""The catalog sample (docs/sample.md): lifespan, typed dependencies, middleware and codecs in
one small app. ``app.py`` is the consumer (an Avro topic and a JSON topic, both converted to
US dollars with the rates service through an HTTP client opened at start); ``rates.py`` is
that rates service; ``send.py`` produces sample records.
"""
