<?php
// HTML phpinfo() of the module section (masking of secret directives).
phpinfo(INFO_MODULES);
