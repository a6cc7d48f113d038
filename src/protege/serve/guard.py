"""When it goes wrong: the server's alarms, and what it does about them.

    protege serve --task TASK_FILE --shadow-rate 0.1 --drift --alarm-agreement 0.85 [--webhook URL]

Every `interval_s` the guard looks at the shadow agreement and the drift statistics. It trips
when the upper bound of the shadow agreement's 95% CI falls under `agreement_floor` (the
specialist is probably worse than that against the frontier), or when a drift alarm is on.
Then the server sends every request to the fallback (`action: fallback`, the threshold made
1.0) or raises the threshold to `raise_to` (`action: threshold`), records why on the
deployment in the store (other servers following it read that and do the same), exposes it in
`/metrics` (`protege_serve_alarm`), logs one error line, and POSTs the alarm to `webhook`.

It returns to normal only when a person resets the alarm (`protege deployments reset
TASK_FILE`) or a new deployment (which passed the gate) takes over. Serving a run directly
(`protege serve run:ID`), the alarm lives in the process: restart it to reset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import datetime, timezone

from ..deploy.registry import get_deployment, raise_alarm
from .app import ServeApp

log = logging.getLogger("protege.serve")


@dataclasses.dataclass
class Policy:
    agreement_floor: float | None = None
    """Trip when the shadow agreement's CI upper bound falls under this (None: never on agreement)."""
    drift: bool = True
    """Trip on a drift alarm (input or label mix)."""
    action: str = "fallback"
    """fallback (everything to the frontier) | threshold (raise it to `raise_to`)."""
    raise_to: float = 0.99
    min_n: int = 50
    """Shadow comparisons needed before the agreement is judged."""


class Guard:
    def __init__(self, policy: Policy, *, store=None, webhook: str | None = None, interval_s: float = 1.0):
        if policy.action not in ("fallback", "threshold"):
            raise ValueError(f"alarm action must be fallback or threshold (got {policy.action!r})")
        self.policy, self.store, self.webhook, self.interval_s = policy, store, webhook, interval_s
        self.alarm: dict | None = None
        self.normal = None
        """The Served the alarm replaced, put back on reset."""
        self.webhook_errors = 0

    async def __call__(self, app: ServeApp) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check(app, loop)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("protege serve: the alarm check failed; serving goes on")

    def policy_for(self, served) -> Policy:
        """The server's policy, with the serving deployment's own alarm settings over it."""
        names = {f.name for f in dataclasses.fields(Policy)}
        return dataclasses.replace(self.policy, **{k: v for k, v in (served.alarm or {}).items() if k in names})

    def reason(self, app: ServeApp, drift: dict | None = None) -> tuple[str, str] | None:
        """(kind, why) of the first condition that holds now, else None. `drift`: the drift
        status already computed for this check (else computed here)."""
        p = self.policy_for(app.served)
        if p.agreement_floor is not None and app.shadow is not None:
            a = app.shadow.stats.agreement()
            if a["n"] >= p.min_n and a["ci95"][1] < p.agreement_floor:
                return "agreement", (f"shadow agreement with {app.shadow.frontier.model} is {a['value']:.1%} over the "
                                     f"last {a['n']} comparisons (95% CI {a['ci95'][0]:.1%} to {a['ci95'][1]:.1%}), "
                                     f"under the floor of {p.agreement_floor:.0%}")
        if p.drift and app.drift is not None:
            s = drift or app.drift.status()
            if s["input"]["alarm"]:
                return "input drift", (f"{s['input']['share']:.0%} of the last {s['window']} inputs are farther from "
                                       f"the training inputs than 95% of held-out ones (p={s['input']['p_value']:.1e})")
            if s["labels"]["alarm"]:
                return "label drift", (f"the answers' label mix moved from the validation split's (chi-square "
                                       f"p={s['labels']['p_value']:.1e})")
        return None

    async def check(self, app: ServeApp, loop) -> None:
        served = app.served
        drift = app.drift.status() if app.drift is not None else None  # once per check
        if app.shadow is not None and drift is not None and (drift["input"]["alarm"] or drift["labels"]["alarm"]):
            app.shadow.raise_rate()  # drifting: check the specialist against the frontier more
        if self.alarm is not None:
            if served.deployment != self.alarm.get("deployment"):  # a new deployment took over
                self._clear(app, "a new deployment took over", restore=False)
            elif served.deployment and self.store is not None:
                d = await loop.run_in_executor(None, get_deployment, self.store, served.deployment)
                if d["alarm"] is None:
                    self._clear(app, "reset", restore=True)
            return
        found = self.reason(app, drift)
        recorded = None
        if found is None and served.deployment and self.store is not None:
            d = await loop.run_in_executor(None, get_deployment, self.store, served.deployment)
            recorded = d["alarm"]  # tripped by another server following the same deployment
        if found is None and recorded is None:
            return
        ours = recorded is None
        if ours:
            kind, why = found
            recorded = {"kind": kind, "reason": why, "since": datetime.now(timezone.utc).isoformat(),
                        "action": self._action_words(served), "deployment": served.deployment, "run_id": served.run_id}
            if served.deployment and self.store is not None:
                # another server may have recorded one a moment before: then it tells the webhook
                ours = await loop.run_in_executor(None, raise_alarm, self.store, served.deployment, recorded)
        self._trip(app, recorded, notify=ours)

    def _action_words(self, served) -> str:
        p = self.policy_for(served)
        if served.fallback is None:
            return "none: no fallback to send requests to"
        if p.action == "fallback":
            return f"every request to {served.fallback.model}"
        return f"threshold raised to {p.raise_to}"

    def _trip(self, app: ServeApp, alarm: dict, notify: bool = True) -> None:
        self.alarm = alarm
        self.normal = app.served
        p = self.policy_for(app.served)
        if app.served.fallback is not None:
            to = 1.0 if p.action == "fallback" else max(p.raise_to, app.served.threshold or 0)
            # threshold above any confidence: "< 1.0000001" sends even a sure answer on
            app.switch(dataclasses.replace(app.served, threshold=to + 1e-9 if to >= 1.0 else to),
                       deployment_changed=False)
        app.metrics.alarm = alarm
        log.error("protege serve: ALARM (%s) on %s: %s; action: %s", alarm["kind"], alarm.get("deployment")
                  or app.served.name, alarm["reason"], alarm["action"])
        if self.webhook and notify:  # once per alarm: by the server that recorded it
            asyncio.get_running_loop().create_task(self._post(alarm))

    def _clear(self, app: ServeApp, why: str, *, restore: bool) -> None:
        if restore and self.normal is not None:
            app.switch(self.normal, deployment_changed=False)
        # judged anew from here: the evidence that tripped the alarm does not trip it again
        if app.shadow is not None:
            app.shadow.stats.window.clear()
        if app.drift is not None:
            app.drift.clear()
        log.warning("protege serve: alarm (%s) cleared: %s", self.alarm["kind"], why)
        self.alarm, self.normal, app.metrics.alarm = None, None, None

    async def _post(self, alarm: dict) -> None:
        import aiohttp

        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.post(self.webhook, json={"event": "protege.alarm", **alarm}) as resp:
                    if resp.status >= 400:
                        raise RuntimeError(f"HTTP {resp.status}")
        except Exception as exc:
            self.webhook_errors += 1
            log.error("protege serve: the alarm webhook %s failed: %s", self.webhook, exc)
