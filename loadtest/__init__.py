"""Load testing for detserve: server-side statistics, stability, and reports beside the measured numbers."""
