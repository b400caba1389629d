"""Load testing for detserve: server-side statistics, stability, and reports beside the measured numbers;
the ops report and the soak (faults under load on a real server: opsreport*.py, soak*.py)."""
