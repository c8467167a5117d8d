"""What a run or a database looks like to a person: status, verify and its statistics, the report,
the live dashboard page."""
