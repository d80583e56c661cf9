#!/usr/bin/env python3
"""Wait until CI has passed on a commit: the gate of docker.yml before anything is tagged, signed or
deployed.

Standard library only (it runs on a bare runner before anything is installed):

    GH_TOKEN=... python3 deploy/await_ci.py --repo OWNER/NAME --sha SHA [--workflow ci.yml]
        [--branch main] [--timeout 4500] [--appear-timeout 600] [--interval 30]

It asks GitHub's REST API for the runs of ``--workflow`` on ``--sha`` triggered by a push to
``--branch`` (``GET /repos/{repo}/actions/workflows/{workflow}/runs?head_sha=&event=push&branch=``):

- a completed run with conclusion ``success``: CI passed, exit 0;
- a run still queued or in progress: wait and ask again;
- only completed runs, none successful (failure, cancelled, timed out...): exit 1 at once (re-run CI,
  then re-run the images workflow);
- no run at all after ``--appear-timeout`` seconds: exit 1. A ``v*`` tag must point at a commit that
  was pushed to main, where CI ran; a tag on any other commit never deploys;
- still waiting after ``--timeout`` seconds: exit 1.

The token needs ``actions: read``. One line per look on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

PENDING = {"queued", "in_progress", "waiting", "requested", "pending"}
"""Statuses of a run that has not finished (GitHub's check-run statuses)."""


class GateError(Exception):
    """CI did not pass on the commit (or could not be asked)."""


def runs(api: str, repo: str, workflow: str, sha: str, branch: str, token: str) -> list[dict[str, Any]]:
    """The workflow's runs on ``sha`` pushed to ``branch``, newest first."""
    query = urllib.parse.urlencode({"head_sha": sha, "event": "push", "branch": branch, "per_page": 50})
    url = f"{api.rstrip('/')}/repos/{repo}/actions/workflows/{urllib.parse.quote(workflow)}/runs?{query}"
    req = urllib.request.Request(url)  # noqa: S310 (GitHub's API URL, from the runner)
    req.add_header("Accept", "application/vnd.github+json")
    req.add_header("X-GitHub-Api-Version", "2022-11-28")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
            payload = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = err.read()[:300].decode(errors="replace")
        err.close()
        raise GateError(f"GitHub answered HTTP {err.code} for {url}: {body}") from None
    found = payload.get("workflow_runs")
    if not isinstance(found, list):
        raise GateError(f"unexpected answer from {url}: {payload!r:.300}")
    # The filter is GitHub's; checked again here, so that a wider answer never lets a commit through.
    return [r for r in found if r.get("head_sha") == sha and r.get("head_branch") == branch]


def verdict(found: list[dict[str, Any]]) -> str:
    """``passed``, ``pending`` (wait), ``failed`` or ``missing`` for the runs of one commit."""
    if any(r.get("status") == "completed" and r.get("conclusion") == "success" for r in found):
        return "passed"
    if any(r.get("status") in PENDING for r in found):
        return "pending"
    return "failed" if found else "missing"


def wait(
    api: str,
    repo: str,
    workflow: str,
    sha: str,
    branch: str,
    token: str,
    timeout: float,
    appear_timeout: float,
    interval: float,
) -> str:
    """Poll until CI passed (returns the run's URL) or raise GateError."""
    start = time.monotonic()
    while True:
        found = runs(api, repo, workflow, sha, branch, token)
        state = verdict(found)
        elapsed = time.monotonic() - start
        summary = ", ".join(f"{r.get('status')}/{r.get('conclusion')}" for r in found) or "no run yet"
        print(f"{workflow} on {sha[:12]} ({branch}): {state} [{summary}] after {elapsed:.0f} s", flush=True)
        if state == "passed":
            return str(next(r for r in found if r.get("conclusion") == "success").get("html_url", ""))
        if state == "failed":
            urls = " ".join(str(r.get("html_url", "")) for r in found)
            raise GateError(f"{workflow} did not pass on {sha}: {summary} ({urls})")
        if state == "missing" and elapsed >= appear_timeout:
            raise GateError(
                f"no run of {workflow} on {sha} pushed to {branch} after {appear_timeout:.0f} s: images "
                f"deploy only from commits CI passed on {branch} (a v* tag must point at one)"
            )
        if elapsed >= timeout:
            raise GateError(f"{workflow} on {sha} still {state} after {timeout:.0f} s")
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True, help="OWNER/NAME")
    parser.add_argument("--sha", required=True, help="the commit (40 hex digits)")
    parser.add_argument("--workflow", default="ci.yml", help="the CI workflow's file name")
    parser.add_argument("--branch", default="main", help="the branch CI must have run on")
    parser.add_argument("--timeout", type=float, default=4500.0, help="seconds to wait for CI at most")
    parser.add_argument(
        "--appear-timeout", type=float, default=600.0, help="seconds to wait for a run to appear"
    )
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between looks")
    parser.add_argument("--api-url", default=os.environ.get("GITHUB_API_URL", "https://api.github.com"))
    args = parser.parse_args(argv)
    if len(args.sha) != 40 or any(c not in "0123456789abcdef" for c in args.sha):
        print(f"FAIL --sha must be 40 lower-case hex digits, got {args.sha!r}")
        return 2
    token = os.environ.get("GH_TOKEN") or os.environ.get("GITHUB_TOKEN") or ""
    try:
        url = wait(
            args.api_url,
            args.repo,
            args.workflow,
            args.sha,
            args.branch,
            token,
            args.timeout,
            args.appear_timeout,
            args.interval,
        )
    except (GateError, OSError) as err:
        print(f"FAIL {err}")
        return 1
    print(f"CI passed on {args.sha}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
