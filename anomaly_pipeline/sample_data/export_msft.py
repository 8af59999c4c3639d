"""Rebuild ``MSFT_1d.csv`` from the Microsoft daily bars bundled with pmdarima.

pmdarima is not a dependency of this project; install it only to rerun this script:
``python -m anomaly_pipeline.sample_data.export_msft [--output-dir DIR]``. The shipped CSV was
made with pmdarima 2.1.1.

The values are copied, never rounded or repaired. The bundled CSV is read with exact decimal
parsing rather than through ``pmdarima.datasets.load_msft()``, whose default pandas parser lands
one unit in the last place away on 5,155 of the 31,932 prices; written back with the shortest
round-trip representation, each number is therefore the very string pmdarima ships.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from importlib import resources
from pathlib import Path

import pandas as pd

OUTPUT_NAME = "MSFT_1d.csv"
# Daily bars are stamped at the session date's local midnight on the listing exchange.
EXCHANGE_TZ = "America/New_York"


def read_bundled_msft() -> pd.DataFrame:
    """pmdarima's bundled MSFT table with columns Date, Open, High, Low, Close, Volume, OpenInt."""
    archive = resources.files("pmdarima.datasets") / "data" / "msft.tar.gz"
    with archive.open("rb") as handle, tarfile.open(fileobj=handle, mode="r:gz") as tar:
        member = tar.getmembers()[0]
        extracted = tar.extractfile(member)
        if extracted is None:
            raise RuntimeError(f"{member.name} in {archive} is not a regular file")
        raw = extracted.read().decode("utf-8")
    return pd.read_csv(io.StringIO(raw), float_precision="round_trip")


def to_sample_frame(msft: pd.DataFrame) -> pd.DataFrame:
    """The columns the sample data uses: UTC timestamp of local midnight, then OHLCV."""
    dates = pd.to_datetime(msft["Date"], format="%Y-%m-%d")
    stamps = pd.DatetimeIndex(dates).tz_localize(EXCHANGE_TZ).tz_convert("UTC")
    return pd.DataFrame(
        {
            "timestamp": stamps.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "open": msft["Open"].to_numpy(),
            "high": msft["High"].to_numpy(),
            "low": msft["Low"].to_numpy(),
            "close": msft["Close"].to_numpy(),
            "volume": msft["Volume"].to_numpy(),
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="directory to write MSFT_1d.csv into (default: next to this script)",
    )
    args = parser.parse_args(argv)
    frame = to_sample_frame(read_bundled_msft())
    # pandas writes floats with repr, the shortest string that parses back to the same value.
    frame.to_csv(args.output_dir / OUTPUT_NAME, index=False, lineterminator="\n")


if __name__ == "__main__":
    main()
