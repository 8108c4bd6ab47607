"""Claude Managed Agents self-hosted environments on this product's sandbox backends.

An *orchestrator* (``agent-environment-orchestrator``) claims the environment's work
items with the environment key and, for each session, makes sure its sandbox runs and
starts a *runner* in it: the ``anthropic`` SDK's environment worker serving that one
item with the item's own credential. See ``README.md`` here.

Modules:

- ``settings``: every setting, read once at start-up
- ``credentials``: the sessions token inside a work item's secret
- ``runner``: what runs in the sandbox (``python3 -m hosting.environments.runner``)
- ``sandboxes``: one sandbox per session, and the runner in it, through the backend
- ``locks``: per-session locks (Redis, or in-process)
- ``lifecycle``: what follows a claimed item (shared by both modes)
- ``dispatch``: claiming items, by long-polling or by draining
- ``webhook``: the webhook receiver
- ``janitor``: idle sandboxes, ended sessions, failed runners
- ``app``: the orchestrator (``__main__`` is the console script: it checks the extra first)
"""
