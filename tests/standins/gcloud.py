"""A recording stand-in of ``gcloud`` for the Cloud Run deploy scripts' tests.

Put on ``PATH`` as ``gcloud`` (``tests/integration/test_cloud_run_deploy.py``): every call is
appended to ``$GCLOUD_STANDIN_LOG`` (one JSON line: its argv and, for ``run services
replace``, the YAML it was given) and answered like gcloud for the calls the scripts make,
against a project whose resources live in ``$GCLOUD_STANDIN_STATE`` (JSON; ``public`` lists
the services ``allUsers`` may invoke). Any other call
exits 2 with a loud message: a script that starts calling something new fails its test
until the stand-in (and so the test) knows what that call does.

The project is ``$GCLOUD_STANDIN_PROJECT`` (unset: no project configured, as after a fresh
``gcloud auth login``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

URL = "https://research-agent-abc123-uc.a.run.app"
PUBLIC_INVOKER_FILTER = "bindings.role=roles/run.invoker AND bindings.members:allUsers"
"""The one ``run services get-iam-policy`` query answered: is ``allUsers`` an invoker."""


GROUPS = {("artifacts", "repositories"): "repositories", ("iam", "service-accounts"): "accounts",
          ("artifacts", "packages"): "packages", ("run", "services"): "services", ("secrets",): "secrets"}
"""Command prefix → the kind of resource its describe/create/delete/add-iam-policy-binding acts on."""


def _split(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional words, and ``--flag=value`` flags (the scripts use only that form)."""
    words = [a for a in argv if not a.startswith("--")]
    flags = dict(a[2:].partition("=")[::2] for a in argv if a.startswith("--"))
    return words, flags


def answer(words: list[str], flags: dict[str, str], state: dict[str, list[str]], stdin: str) -> tuple[int, str]:
    """(exit code, stdout) for one call; ``KeyError`` for a call this stand-in does not know."""
    if words == ["config", "get-value", "project"]:
        return 0, os.environ.get("GCLOUD_STANDIN_PROJECT", "") + "\n"
    project = flags.get("project")
    if not project:
        raise KeyError("a call without --project")
    if words[:2] == ["services", "enable"]:
        return 0, ""
    if words[:3] == ["run", "services", "get-iam-policy"] and flags.get("filter") == PUBLIC_INVOKER_FILTER:
        return 0, "roles/run.invoker\n" if words[3] in state.get("public", []) else ""
    if words[:2] == ["run", "services"] and words[2:3] in (["add-iam-policy-binding"], ["remove-iam-policy-binding"]) \
            and flags.get("member") == "allUsers" and flags.get("role") == "roles/run.invoker":
        public = state.setdefault("public", [])
        if words[3] not in state.get("services", []):
            return 1, ""
        if words[2] == "add-iam-policy-binding":
            if words[3] not in public:
                public.append(words[3])
            return 0, ""
        if words[3] not in public:  # as gcloud: no such binding is an error
            return 1, ""
        public.remove(words[3])
        return 0, ""
    if words[:2] == ["builds", "submit"] and flags.get("substitutions", "").startswith("_IMAGE="):
        words = ["artifacts", "packages", "create", "research-agent"]  # the build pushes the image
    elif words[:3] == ["run", "services", "replace"]:
        words = ["run", "services", "create", yaml.safe_load(Path(words[3]).read_text())["metadata"]["name"]]
    elif words[:3] == ["iam", "service-accounts", "create"]:
        words = [*words[:3], f"{words[3]}@{project}.iam.gserviceaccount.com"]
    prefix = next((prefix for prefix in GROUPS if tuple(words[:len(prefix)]) == prefix), None)
    if prefix is None or len(words) != len(prefix) + 2:
        raise KeyError(" ".join(words[:3]))
    verb, name = words[len(prefix):]
    held = state.setdefault(GROUPS[prefix], [])
    if verb == "create" and (GROUPS[prefix] != "secrets" or stdin):
        if name not in held:
            held.append(name)
        return 0, ""
    if verb == "delete" and name in held:
        held.remove(name)
        if name in state.get("public", []):  # its policy goes with it
            state["public"].remove(name)
        return 0, ""
    if verb == "describe" and flags.get("format") == "value(status.url)" and name in held:
        return 0, URL + "\n"
    if verb in ("describe", "add-iam-policy-binding") and "format" not in flags:
        return (0, f"name: {name}\n") if name in held else (1, "")
    if verb in ("delete", "describe"):
        return 1, ""
    raise KeyError(" ".join(words))


def main() -> int:
    argv = sys.argv[1:]
    stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    words, flags = _split(argv)
    state_path = Path(os.environ["GCLOUD_STANDIN_STATE"])
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    record: dict[str, Any] = {"argv": argv, "stdin": bool(stdin)}
    if words[:3] == ["run", "services", "replace"]:
        record["yaml"] = Path(words[3]).read_text()  # deploy.sh removes its copy on exit
    with open(os.environ["GCLOUD_STANDIN_LOG"], "a") as log:
        log.write(json.dumps(record) + "\n")
    try:
        code, out = answer(words, flags, state, stdin)
    except KeyError as exc:
        print(f"GCLOUD STAND-IN: UNKNOWN CALL ({exc.args[0]}): gcloud {' '.join(argv)}", file=sys.stderr)
        return 2
    state_path.write_text(json.dumps(state))
    if code:
        print(f"ERROR: (gcloud) NOT_FOUND: {' '.join(words)}", file=sys.stderr)
    sys.stdout.write(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
