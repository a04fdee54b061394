"""`spotrun estimate`: the expected-cost model, Young's interval, portfolios, the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from spotrun.cli import main
from spotrun.cost import PriceBook, estimate_job, evaluate_portfolio, load_toml, rate_per_hour, young_interval
from spotrun.cost.estimate import expected_wall_time, parse_duration
from spotrun.errors import ConfigError, CostError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTRUN_CACHE_DIR", str(tmp_path / "cache"))


def book(spot: float, od: float) -> PriceBook:
    return PriceBook(spot_price=spot, on_demand_price=od, offline=True)


def test_young_interval_known_cases():
    assert young_interval(60, 10 * 3600) == pytest.approx(math.sqrt(2 * 60 * 36000))  # 2078.46 s
    assert young_interval(50, 100) == pytest.approx(100.0)  # sqrt(2*50*100)
    assert young_interval(0, 3600) == 0.0
    # The model's own minimum sits at Young's interval when saves are short against the MTBI.
    C, M, W, R = 30.0, 20 * 3600.0, 100 * 3600.0, 120.0
    grid = [C * 2 + k * 5.0 for k in range(2000)]
    best = min(grid, key=lambda tau: expected_wall_time(W, tau, C, R, 1 / M)["wall_s"])
    assert best == pytest.approx(young_interval(C, M), rel=0.05)


def test_advisor_buckets_map_monthly_frequency_to_hourly_rate():
    assert rate_per_hour("5-10%") == pytest.approx(-math.log(1 - 0.075) / 730)
    assert rate_per_hour(">20%") == pytest.approx(-math.log(1 - 0.25) / 730)
    assert rate_per_hour("0.02") == 0.02 and rate_per_hour(0.5) == 0.5
    with pytest.raises(ConfigError):
        rate_per_hour("often")
    assert parse_duration("15m") == 900 and parse_duration("2h") == 7200 and parse_duration("90") == 90


def test_estimate_arithmetic():
    W_h, runs, tau, C, R, lam_h = 10.0, 4.0, 1800.0, 60.0, 300.0, 0.01
    spot, od = 0.4, 1.2
    e = estimate_job(instance_type="g5.xlarge", hours_per_run=W_h, runs_per_month=runs,
                     interruption_rate=lam_h, checkpoint_save_s=C, restart_s=R,
                     checkpoint_interval_s=tau, prices=book(spot, od))
    W = W_h * 3600
    lam = lam_h / 3600
    T = W * (1 + C / tau) / (1 - lam * (R + (tau + C) / 2))
    assert e.at_interval["wall_s"] == pytest.approx(T)
    assert e.at_interval["interruptions"] == pytest.approx(lam * T)
    parts = e.at_interval["checkpoint_s"] + e.at_interval["rework_s"] + e.at_interval["restart_s"]
    assert W + parts == pytest.approx(T)
    assert e.spot_cost_per_month == pytest.approx(T / 3600 * spot * runs)
    assert e.on_demand_cost_per_month == pytest.approx(W_h * od * runs)
    assert e.savings_per_month == pytest.approx(W_h * od * runs - T / 3600 * spot * runs)
    assert e.recommended_interval_s == pytest.approx(math.sqrt(2 * C * 3600 / lam_h))
    assert e.at_recommended["wall_s"] <= T
    assert e.overhead_pct == pytest.approx(100 * (T - W) / W)


def test_model_matches_a_simulation():
    """A Monte-Carlo run of checkpoint/interrupt/restart agrees with the closed form."""
    W, tau, C, R, lam = 20 * 3600.0, 3600.0, 120.0, 600.0, 0.05 / 3600
    rng = random.Random(7)
    total, n_runs = 0.0, 3000
    for _ in range(n_runs):
        done, clock = 0.0, 0.0
        next_fail = rng.expovariate(lam)
        while done < W:
            chunk = min(tau, W - done)
            need = chunk + C
            if clock + need <= next_fail:
                clock += need
                done += chunk
            else:  # interrupted: lose the chunk in progress, pay a restart
                clock = next_fail + R
                next_fail = clock + rng.expovariate(lam)
        total += clock
    simulated = total / n_runs
    model = expected_wall_time(W, tau, C, R, lam)["wall_s"]
    assert model == pytest.approx(simulated, rel=0.03)


def test_hopeless_job_is_an_error():
    with pytest.raises(CostError, match="never to finish"):
        expected_wall_time(3600 * 10, 3600 * 4, 60, 3600, 1 / 3600)


PORTFOLIO = """
name = "test"
days_per_month = 30
[strategies]
reserved_discount = 0.25
[prices]
"big.gpu" = 2.0
"small.gpu" = 1.5
"api.large" = 0.10
"api.small" = 0.06
[spot_prices]
"big.gpu" = 0.6
"small.gpu" = 0.45

[[training]]
name = "train"
instance_type = "big.gpu"
hours_per_run = 5
runs_per_month = 3
market = "on-demand"
interruptible = true
interruption_rate = 0.02
checkpoint_save_s = 30
restart_s = 200
checkpoint_interval_s = 900
right_size_to = "small.gpu"

[[training]]
name = "pinned"
instance_type = "big.gpu"
hours_per_run = 1
runs_per_month = 2

[[inference]]
name = "api"
instance_type = "api.large"
replicas = 3
hours_per_day = 24
steady = true
right_size_to = "api.small"

[[inference]]
name = "day-api"
instance_type = "api.large"
replicas = 2
hours_per_day = 24
steady = true
schedule_hours_per_day = 10

[[other]]
name = "data"
category = "storage"
monthly_cost = 100
cold_fraction = 0.5
cold_price_ratio = 0.2

[[other]]
name = "egress"
category = "network"
monthly_cost = 40
"""


def test_portfolio_arithmetic_without_double_counting(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(PORTFOLIO)
    r = evaluate_portfolio(load_toml(path), prices=PriceBook(offline=True)).to_dict()

    # Training "train": on-demand today; right-size first, then spot on the smaller type.
    train_now = 5 * 3 * 2.0
    train_rs = 5 * 3 * 1.5
    W, lam, tau, C, R = 5 * 3600, 0.02 / 3600, 900, 30, 200
    T = W * (1 + C / tau) / (1 - lam * (R + (tau + C) / 2))
    train_spot = T / 3600 * 0.45 * 3
    pinned = 1 * 2 * 2.0
    # Inference "api": right-size, then reserved on what is left (not on the original cost).
    api_now = 0.10 * 3 * 24 * 30
    api_rs = 0.06 * 3 * 24 * 30
    api_ri = api_rs * (1 - 0.25)
    # "day-api": a schedule makes it not 24/7, so no reserved pricing is stacked on it.
    day_now = 0.10 * 2 * 24 * 30
    day_sched = day_now * 10 / 24
    data_after = 100 * (1 - 0.5 * (1 - 0.2))

    items = {i["name"]: i for i in r["items"]}
    assert items["train"]["monthly"] == pytest.approx(train_now)
    assert items["train"]["optimised"] == pytest.approx(train_spot)
    assert items["pinned"]["optimised"] == pytest.approx(pinned)
    assert items["api"]["optimised"] == pytest.approx(api_ri)
    assert items["day-api"]["optimised"] == pytest.approx(day_sched)
    assert items["data"]["optimised"] == pytest.approx(data_after)

    plan = [(s["item"], s["strategy"]) for s in r["plan"]]
    assert plan == [("train", "right-sizing"), ("train", "spot"), ("api", "right-sizing"),
                    ("api", "reserved / savings plan"), ("day-api", "off-hours schedule"),
                    ("data", "storage tiering")]
    steps = {(s["item"], s["strategy"]): s for s in r["plan"]}
    assert steps[("api", "reserved / savings plan")]["saved"] == pytest.approx(api_rs * 0.25)
    assert steps[("api", "reserved / savings plan")]["pct"] == pytest.approx(25.0)
    assert steps[("train", "spot")]["before"] == pytest.approx(train_rs)
    assert steps[("train", "spot")]["risk"] == "medium"  # 0.02/h is above the 5-10% bucket

    now = train_now + pinned + api_now + day_now + 100 + 40
    after = train_spot + pinned + api_ri + day_sched + data_after + 40
    assert r["monthly"] == pytest.approx(now) and r["annual"] == pytest.approx(12 * now)
    assert r["optimised_monthly"] == pytest.approx(after)
    assert sum(s["saved"] for s in r["plan"]) == pytest.approx(now - after)
    assert r["saved_pct"] == pytest.approx(100 * (now - after) / now)
    assert r["by_category"] == pytest.approx(
        {"training": train_now + pinned, "inference": api_now + day_now, "storage": 100, "network": 40})


def test_example_portfolio_runs_offline(capsys):
    rc = main(["estimate", "--portfolio", str(REPO / "examples" / "portfolio.toml"), "--offline", "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["monthly"] == pytest.approx(sum(i["monthly"] for i in d["items"]))
    assert d["optimised_monthly"] == pytest.approx(sum(i["optimised"] for i in d["items"]))
    assert sum(s["saved"] for s in d["plan"]) == pytest.approx(d["monthly"] - d["optimised_monthly"])
    # The course's 2 x t3.medium 24/7 endpoint, priced from the snapshot: 2 x 0.0416 x 24 x 30.
    api = next(i for i in d["items"] if i["name"] == "BankChurn-API")
    assert api["monthly"] == pytest.approx(2 * 0.0416 * 24 * 30)
    assert {s["strategy"] for s in d["plan"]} >= {"spot", "reserved / savings plan", "off-hours schedule",
                                                  "storage tiering", "right-sizing"}


def test_cli_estimate_text_and_json(capsys):
    args = ["estimate", "p3.2xlarge", "--hours", "8", "--runs", "2", "--interruption-rate", "0.05",
            "--checkpoint-save", "1m", "--restart", "5m", "--checkpoint-interval", "30m",
            "--spot-price", "0.9", "--on-demand-price", "3.06"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "recommended interval" in text and "savings" in text
    assert main([*args, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    W, lam, tau, C, R = 8 * 3600, 0.05 / 3600, 1800, 60, 300
    T = W * (1 + C / tau) / (1 - lam * (R + (tau + C) / 2))
    assert d["spot_cost_per_month"] == pytest.approx(T / 3600 * 0.9 * 2)
    assert d["on_demand_cost_per_month"] == pytest.approx(8 * 3.06 * 2)
    assert d["recommended_interval_s"] == pytest.approx(math.sqrt(2 * 60 * 3600 / 0.05))
    assert main(["estimate", "--hours", "3"]) == 2
    assert "INSTANCE_TYPE" in capsys.readouterr().err
    assert main(["estimate", "g5.xlarge", "--hours", "3", "--interruption-rate", "sometimes", "--offline"]) == 2
    assert main(["estimate", "--portfolio", "/nonexistent.toml", "--offline"]) == 2


def test_estimate_asks_aws_for_todays_spot_price(tmp_path):
    """Today's spot price: the mean of each zone's latest price (stubbed EC2 API)."""
    from datetime import datetime, timezone

    import boto3
    from botocore.stub import ANY, Stubber

    ec2 = boto3.client("ec2", region_name="eu-west-1")
    pricing = boto3.client("pricing", region_name="us-east-1")
    now = datetime.now(tz=timezone.utc).timestamp()

    def row(zone, t, p):
        return {"AvailabilityZone": zone, "InstanceType": "g5.xlarge", "ProductDescription": "Linux/UNIX",
                "SpotPrice": str(p), "Timestamp": datetime.fromtimestamp(t, tz=timezone.utc)}

    with Stubber(ec2) as es, Stubber(pricing) as ps:
        es.add_response("describe_spot_price_history", {"SpotPriceHistory": [
            row("eu-west-1a", now - 500, 0.50), row("eu-west-1a", now - 5000, 0.90),
            row("eu-west-1b", now - 100, 0.30)]},
            {"InstanceTypes": ["g5.xlarge"], "ProductDescriptions": ["Linux/UNIX"], "StartTime": ANY, "EndTime": ANY})
        ps.add_client_error("get_products", "ThrottlingException", "slow down")
        clients = {"ec2": ec2, "pricing": pricing}
        e = estimate_job(instance_type="g5.xlarge", hours_per_run=1, region="eu-west-1",
                         interruption_rate=0, prices=PriceBook(client_factory=lambda s, r: clients[s]))
        es.assert_no_pending_responses()
    assert e.spot_price.source == "aws-api" and e.spot_price.usd_per_hour == pytest.approx((0.50 + 0.30) / 2)
    assert e.on_demand_price.source == "snapshot" and "ThrottlingException" in e.on_demand_price.fallback
    assert "eu-west-1" in e.on_demand_price.detail  # the snapshot says it lists us-east-1 only
