"""action_id values shared by the block builders and the action listeners."""
RETRAIN_NEW_DATA = "retrain_now"           # value: alert id (bot/demo.py clicks it by this id)
REFRESH_NEW_DATA = "ct_refresh_gallery"    # value: alert id; a mode=refresh run
DISMISS_ALERT = "ct_dismiss_alert"         # value: alert id
PROMOTE = "ct_promote"                     # value: run id
ROLLBACK = "ct_rollback"                   # value: production version at render time
VIEW_RUN = "ct_view_run"                   # value: run id
RETRAIN = "ct_retrain"                     # value: run id whose params to reuse
CANCEL_RUN = "ct_cancel_run"               # value: run id
APPROVE_DEPLOY = "ct_approve_deploy"       # value: run id
REJECT_DEPLOY = "ct_reject_deploy"         # value: run id
RETRY_FIRE = "ct_retry_fire"               # value: fire id ("weekly:2026-W48")

ALL = (RETRAIN_NEW_DATA, REFRESH_NEW_DATA, DISMISS_ALERT, PROMOTE, ROLLBACK, VIEW_RUN, RETRAIN, CANCEL_RUN,
       APPROVE_DEPLOY, REJECT_DEPLOY, RETRY_FIRE)
TRAIN_FORM = "ct_train_form"              # callback_id of the training form (modal)
# The Home tab's own buttons (its Cancel, Approve and Reject are the run message's, above).
HOME_TRAIN = "ct_home_train"               # opens the training form
HOME_ROLLBACK_TO = "ct_home_rollback_to"   # value: "<version>:<production version at render time>"
HOME_PAUSE = "ct_home_pause"               # value: "pause"
HOME_RESUME = "ct_home_resume"             # value: "resume"
