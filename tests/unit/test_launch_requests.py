"""The launcher's request codec (``hosting.sandboxes.launch``): one JSON line that decodes to
what was encoded, refused when no process could start with it or when it is not exactly right,
and exit statuses as a shell reports them (the launcher as a process:
tests/integration/test_sandbox_launch.py)."""

from __future__ import annotations

import pytest

from hosting.sandboxes.launch import LaunchRequest, decode_request, encode_request, exit_status


def test_a_request_is_one_json_line_that_decodes_to_what_was_encoded() -> None:
    line = encode_request(("python3", "-c", "print('a b')", "it's $HOME\n"), {"TOKEN": "s e\ncret"}, detach=True)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_request(line) == LaunchRequest(["python3", "-c", "print('a b')", "it's $HOME\n"],
                                                 {"TOKEN": "s e\ncret"}, True)
    assert decode_request(encode_request(["true"], None, detach=False)) == LaunchRequest(["true"], {}, False)


@pytest.mark.parametrize(("argv", "env"), [
    ([], {}), (["a\0b"], {}), (["ok", 3], {}), (["ok"], {"": "v"}), (["ok"], {"A=B": "v"}), (["ok"], {"A": "v\0"}),
])
def test_what_no_process_could_start_with_is_refused_before_it_is_sent(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="argv|env"):
        encode_request(argv, env, detach=False)


@pytest.mark.parametrize("line", [
    b"", b"not json\n", b"\xff\n", b"[]\n", b'{"argv": ["a"], "env": {}}\n',
    b'{"argv": ["a"], "env": {}, "detach": false, "cwd": "/"}\n', b'{"argv": "a", "env": {}, "detach": false}\n',
    b'{"argv": ["a"], "env": {"A": 1}, "detach": false}\n', b'{"argv": ["a"], "env": {}, "detach": "no"}\n',
])
def test_a_request_that_is_not_exactly_right_is_refused_with_a_reason(line: bytes) -> None:
    with pytest.raises(ValueError, match="request|argv|env|detach"):
        decode_request(line)


def test_a_status_reads_as_a_shell_reports_it() -> None:
    assert [exit_status(code) for code in (0, 3, -9, -15)] == [0, 3, 137, 143]
