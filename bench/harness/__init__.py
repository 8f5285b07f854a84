"""The benchmark harness: what every scenario in `bench/` stands on.

- `processes`: free ports, waiting for a process to listen or answer, stopping it, and what
  /proc says about it (CPU, resident set, children, how busy the machine is);
- `upstream`: the fake OpenAI-compatible upstream the scenarios measure against;
- `databases`: the SQLite file or the freshly created PostgreSQL database a service runs on;
- `servers`: the processes a scenario compares (the upstream, our service, the lean reference
  server of `bench/lean.py`, LiteLLM), and a redis-server of its own for instances of ours that
  share one;
- `litellm`: how the peer, the LiteLLM proxy, is configured and run offline;
- `clients`: the lean HTTP/1.1 client, SSE parsing, JWT user tokens, the client's event loop;
- `targets`: the configurations a streaming scenario talks to, and the clients' conversations;
- `report`: the one percentile function, figures, and bench/results/latest.json and latest.md;
- `scenario`: the options and the run of a scenario that starts servers.

Scenarios (`bench/*.py`) import only public names from here, never from one another, and
nothing here imports the test suite: the benchmarks must not change when the tests do.
"""
