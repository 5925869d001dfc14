#ifndef _KSHIM_COUNTERS_H_
#define _KSHIM_COUNTERS_H_

#include "super.h"

#define scoutfs_inc_counter(sb, which) \
	atomic_fetch_add(&SCOUTFS_SB(sb)->counters.which, 1)

#endif
