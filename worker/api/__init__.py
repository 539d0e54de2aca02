"""`release-worker api`: the partner API page `POST /v1/cart/release` over HTTP, on top of
the Kafka pipeline (DESIGN.md §8). See docs/api.md.

- `service`: one request → one input record → its results → one answer;
- `waiters`: requests in flight, completed by partner + eventId;
- `results`: each process's own reader of the results topic (no consumer group);
- `http`: the FastAPI app, its OpenAPI document and the probes;
- `server`: wiring and the uvicorn server.
"""
