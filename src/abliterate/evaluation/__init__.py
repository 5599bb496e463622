"""What an edit did: judged answers, statistics, damage metrics, the standalone evaluate and benchmark."""
