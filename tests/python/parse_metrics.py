"""Parses a /metrics page from standard input with the official prometheus_client parser of
the format named by the one argument (openmetrics or prometheus), and prints its families as
JSON for tests/observability.rs. A page that does not parse fails with the parser's error."""

import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_prometheus

PARSERS = {"openmetrics": parse_openmetrics, "prometheus": parse_prometheus}


def main():
    parse = PARSERS[sys.argv[1]]
    families = [
        {
            "name": family.name,
            "type": family.type,
            "samples": [
                {"name": sample.name, "labels": sample.labels, "value": sample.value}
                for sample in family.samples
            ],
        }
        for family in parse(sys.stdin.read())
    ]
    json.dump(families, sys.stdout)


if __name__ == "__main__":
    main()
