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

ALL = (RETRAIN_NEW_DATA, REFRESH_NEW_DATA, DISMISS_ALERT, PROMOTE, ROLLBACK, VIEW_RUN, RETRAIN, CANCEL_RUN, APPROVE_DEPLOY,
       REJECT_DEPLOY)
TRAIN_FORM = "ct_train_form"              # callback_id of the training form (modal)
