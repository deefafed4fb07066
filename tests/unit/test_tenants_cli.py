"""`aimesh tenants`: durations and where the admin token comes from."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest
from aimesh_servers.tenancy.cli import admin_token, parse_duration


@pytest.mark.parametrize(("text", "expected"), [
    ("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("15m", timedelta(minutes=15)),
    ("45s", timedelta(seconds=45)), ("2w", timedelta(weeks=2)), ("90", timedelta(seconds=90)),
    ("1.5h", timedelta(minutes=90)),
])
def test_durations(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "d", "30 days", "-1d", "1y"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(argparse.ArgumentTypeError, match="30d"):
        parse_duration(text)


def test_the_admin_token_comes_from_the_flag_then_the_environment_then_the_state_dir(tmp_path):
    (tmp_path / "admin.token").write_text("from-file\n")
    args = argparse.Namespace(token="from-flag", state_dir=str(tmp_path))
    assert admin_token(args, {"AIMESH_TOKEN": "from-env"}) == "from-flag"
    args.token = None
    assert admin_token(args, {"AIMESH_TOKEN": "from-env"}) == "from-env"
    assert admin_token(args, {}) == "from-file"
    args.state_dir = str(tmp_path / "elsewhere")
    with pytest.raises(SystemExit, match="no admin token"):
        admin_token(args, {})
