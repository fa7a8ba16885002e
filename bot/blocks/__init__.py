"""Pure Block Kit builders. Each returns {"text": fallback, "blocks": [...]} (no I/O)."""
from bot.blocks.alerts import fire_failed, new_data_alert, resolved
from bot.blocks.home import history_message, home_view
from bot.blocks.limits import check_limits, fit, fit_message, fit_view
from bot.blocks.overview import audit_message, data_message, runs_message, schedule_message, status_message
from bot.blocks.replies import error, help_message, info, other_command, unknown_subcommand, working
from bot.blocks.run import final_report, run_details, run_progress, thread_details

__all__ = ["history_message", "home_view", "fit_view", "audit_message", "fire_failed", "new_data_alert", "resolved",
           "check_limits", "fit", "fit_message", "data_message", "runs_message", "schedule_message",
           "status_message", "error", "help_message", "info", "other_command",
           "unknown_subcommand", "working", "final_report", "run_details", "run_progress",
           "thread_details"]
